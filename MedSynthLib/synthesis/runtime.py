"""Process-wide settings for MedSynth's own processes (the CLI and the Slicer backend workers).

Never called on import: a host application (3D Slicer) keeps its own settings.
"""

from __future__ import annotations

import os


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
