"""Process-wide settings for MedSynth's own processes (the CLI and the Slicer backend workers).

Never called on import: a host application (3D Slicer) keeps its own settings.
"""

from __future__ import annotations

import os
import sys


def avoid_hugepage_stalls() -> bool:
    """Stop numpy requesting transparent huge pages (``madvise``) for its large arrays.

    Where the kernel's THP ``defrag`` setting is ``madvise`` (a common default), every such
    request may compact memory synchronously.  Measured on the development machine: allocating
    one 143 MB output array in a process that had run the network took 0.19-0.39 s with the
    request and 0.06-0.08 s without.  An explicit ``NUMPY_MADVISE_HUGEPAGE`` is respected.

    Returns:
        whether the setting was changed.
    """
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return False
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:
        try:
            from numpy.core.multiarray import _set_madvise_hugepage  # numpy 1.x
        except ImportError:
            return False
    _set_madvise_hugepage(False)
    return True


#: Peak resident bytes per voxel of the label map's grid of ``medsynth synthesize`` with freed memory kept and the
#: mirror average, an all-brain map, bf16 (the process with the model loaded, 0.36 GB, apart): 192^3 1.40 GB (147 bytes
#: per voxel), 256^3 2.55 GB (130); without keeping it 1.00 / 1.68 GB.  Rounded up to keep a margin.
KEEP_FREED_BYTES_PER_VOXEL = 192


def keep_freed_memory(voxels: int = 0) -> bool:
    """Let glibc serve every allocation from its heap and keep freed memory for the next one.

    For a short-lived process that runs the network a few times (``medsynth synthesize``: the pass and its mirrored
    pass).  By default every block over 32 MB (the network's activations) is mapped on allocation and unmapped when
    freed, so each pass faults its pages in again.  Measured on the development machine (2 cores, the default model
    with the mirror average, BraTS2021_00000, ``benchmarks/bench_synthesis.py``): ``medsynth synthesize`` 2.76 s ->
    2.46-2.58 s end to end, peak memory 0.91 -> 1.03-1.05 GB.  The heap's fragments cost more on large grids
    (:data:`KEEP_FREED_BYTES_PER_VOXEL`), so a grid whose synthesis would then not fit the memory budget
    (``MEDSYNTH_MEMORY_BUDGET_GB``) keeps the default.  Not for long-running processes (their memory would stay at
    its high-water mark).  An explicit ``MALLOC_MMAP_MAX_`` or ``MALLOC_TRIM_THRESHOLD_`` is respected; elsewhere
    than Linux with glibc nothing changes.

    Args:
        voxels: the label map's grid size, in voxels.

    Returns:
        whether the setting was changed.
    """
    from ..schema.budget import SYNTHESIS_FIXED_BYTES, budget_bytes

    if not sys.platform.startswith("linux") or {"MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"} & set(os.environ):
        return False
    if voxels * KEEP_FREED_BYTES_PER_VOXEL + SYNTHESIS_FIXED_BYTES > budget_bytes():
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's <malloc.h>
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
