"""Pack a prepared training set into compressed parts small enough to send to a GPU machine.

The GPU machines MedSynth is trained on here take at most 64 MiB per transfer, and the 27 prepared
cases are 0.9 GB as float16.  Each case's images are stored as int16 steps of 1/16 z (z-score sets;
their uniform rounding error, 0.018 z rms, is far below the scans' own noise; a percentile set's in
steps of 1/2048) and compressed with lzma; label maps and normalisation statistics are kept exactly.  ``unpack.py`` turns the parts back into a prepared set.

    python benchmarks/gpu_training/pack.py /work/runs/prepared27 .gpu --budgets-mb 5 58 58 58
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from MedSynthLib.synthesis.normalize import ZSCORE_KINDS  # noqa: E402
from MedSynthLib.training.data import PREPARED_SET_FILE, read_prepared_set, volume_file_name  # noqa: E402

#: Steps per z unit of the packed images (z-score sets), and per unit of a percentile set's [-1, 1].
STEPS_PER_Z = 16
STEPS_PER_PERCENTILE_UNIT = 2048


def step_of(normalization: str) -> float:
    """The packed images' step, in the stored units (a z-score set stores z / its clip)."""
    if normalization in ZSCORE_KINDS:
        return 1.0 / (STEPS_PER_Z * ZSCORE_KINDS[normalization])
    return 1.0 / STEPS_PER_PERCENTILE_UNIT


def pack_case(volume_file: Path, step: float) -> bytes:
    with np.load(volume_file) as data:
        steps = np.round(data["images"].astype(np.float32) / step).astype(np.int16)
        buffer = io.BytesIO()
        np.savez(buffer, labels=data["labels"], images=steps, normalizers=data["normalizers"], step=np.float64(step))
    return lzma.compress(buffer.getvalue(), preset=6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prepared", type=Path, help="a prepared training set (medsynth prepare)")
    parser.add_argument("output", type=Path, help="folder for part1/, part2/, ... (replaced)")
    parser.add_argument("--budgets-mb", type=float, nargs="+", required=True,
                        help="the space each part may take, in MB (the first also holds the manifest)")
    args = parser.parse_args()
    normalization, sources = read_prepared_set(args.prepared)
    step = step_of(normalization)
    if args.output.exists():
        shutil.rmtree(args.output)
    parts = [args.output / f"part{i + 1}" for i in range(len(args.budgets_mb))]
    for part in parts:
        part.mkdir(parents=True)
    manifest = json.loads((args.prepared / PREPARED_SET_FILE).read_text())
    manifest["packed_images"] = f"int16 steps of {step:.6g} (benchmarks/gpu_training/pack.py)"
    (parts[0] / PREPARED_SET_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    used = [0.0] * len(parts)
    for source in sources:
        blob = pack_case(args.prepared / volume_file_name(source.key, normalization), step)
        size = len(blob) / 1e6
        room = [i for i, b in enumerate(args.budgets_mb) if used[i] + size <= b]
        if not room:
            raise SystemExit(f"{source.name}: {size:.1f} MB does not fit in the parts' budgets")
        i = room[0]
        (parts[i] / f"{source.key}.npz.xz").write_bytes(blob)
        used[i] += size
        print(f"{source.name}: {size:.2f} MB -> part{i + 1}", flush=True)
    print("parts (MB):", " ".join(f"{u:.1f}" for u in used))


if __name__ == "__main__":
    main()
