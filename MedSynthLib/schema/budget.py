"""The memory budget: every size an input asks for is checked against it before allocating.

A header costs a few hundred bytes, the volume it describes can cost gigabytes, so
image sizes are read from headers, network sizes from configs and the shapes stored
in safetensors headers, and grid sizes from spacings, and each is refused with one
line when the work it implies would not fit.  The budget is
``MEDSYNTH_MEMORY_BUDGET_GB`` (default 8 GiB); the costs per voxel are measured (see
the README section "Memory").
"""

from __future__ import annotations

import math
import os

from .errors import InputError

DEFAULT_BUDGET_GB = 8.0
# Peak resident bytes of a synthesis per voxel of the label map's grid.  Measured (in-process
# SynthesisEngine.synthesize + write_synthesis, shipped model, CPU, bf16, an all-brain label map):
# 96^3 0.43 GB, 192^3 (7.1 M voxels, whole box) 0.90 GB, 256^3 (16.8 M, sliding windows) 1.52 GB peak
# resident, of which 0.36 GB is the process with the model loaded: 68-87 bytes per voxel; in fp32 the
# 192^3 whole box peaks at 1.11 GB, 107 bytes per voxel.  The SPADE default of sessions 30-34 (medsynth-spade27-ssim,
# the network of medsynth-spade27-cpu and of the default since), synthesis alone: 192^3 0.91 GB bf16 / 1.06 GB fp32
# (78-98 bytes per voxel); with the mirror average of session 37, the medsynth synthesize process: 192^3 1.00 GB,
# 256^3 1.68 GB (79-92).  Rounded up to keep a margin.  (Where it keeps freed memory, runtime.keep_freed_memory
# checks its own, larger cost against the budget.)
SYNTHESIS_BYTES_PER_VOXEL = 128
# The fixed part: interpreter, torch and the model (0.36 GB measured), with a margin.
SYNTHESIS_FIXED_BYTES = 1 << 30
# The largest generator MedSynth builds, in parameters (the shipped one has 2.4 M).
MAX_NETWORK_PARAMETERS = 200_000_000


def budget_bytes() -> int:
    """The memory budget in bytes (``MEDSYNTH_MEMORY_BUDGET_GB`` overrides the default)."""
    text = os.environ.get("MEDSYNTH_MEMORY_BUDGET_GB", "")
    try:
        value = float(text) if text else DEFAULT_BUDGET_GB
    except ValueError:
        raise InputError(None, f"MEDSYNTH_MEMORY_BUDGET_GB={text!r} is not a number of GiB") from None
    if not math.isfinite(value) or value <= 0:
        raise InputError(None, f"MEDSYNTH_MEMORY_BUDGET_GB={text!r} must be a positive number of GiB")
    return int(value * (1 << 30))


def max_voxels() -> int:
    """The largest grid (in voxels) whose synthesis fits the budget."""
    return max(0, budget_bytes() - SYNTHESIS_FIXED_BYTES) // SYNTHESIS_BYTES_PER_VOXEL


def check_voxels(path: object, size: tuple[int, ...], what: str = "image") -> None:
    """Refuse a grid whose processing would not fit the memory budget (before reading its voxels)."""
    count = math.prod(int(s) for s in size)
    limit = max_voxels()
    if count > limit:
        shape = "x".join(str(int(s)) for s in size)
        raise InputError(path, f"{what} of {shape} = {count:,} voxels needs about "
                               f"{(count * SYNTHESIS_BYTES_PER_VOXEL + SYNTHESIS_FIXED_BYTES) / (1 << 30):.0f} GiB, "
                               f"over the memory budget of {budget_bytes() / (1 << 30):g} GiB ({limit:,} voxels; "
                               "set MEDSYNTH_MEMORY_BUDGET_GB to change it)")
