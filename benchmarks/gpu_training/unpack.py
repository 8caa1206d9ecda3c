"""Turn parts written by ``pack.py`` back into a prepared training set (float16 volumes, manifest).

The manifest records the sha256 of each volume written here (the packed manifest's hashes are of the
volumes before rounding), so training verifies the unpacked volumes as it does a freshly prepared set;
``unpacked_images`` says they were rounded.

    python benchmarks/gpu_training/unpack.py .gpu/part1 -o /root/prepared27
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from MedSynthLib.schema.provenance import file_sha256  # noqa: E402
from MedSynthLib.training.data import PREPARED_SET_FILE, volume_file_name  # noqa: E402


def unpack_case(packed: Path, output: Path, normalization: str) -> str:
    with np.load(io.BytesIO(lzma.decompress(packed.read_bytes()))) as data:
        images = data["images"].astype(np.float64) * float(data["step"])
        key = packed.name.split(".")[0]
        tmp = output / f".{key}.tmp.npz"
        np.savez(tmp, labels=data["labels"], images=images.astype(np.float16), normalizers=data["normalizers"])
        tmp.replace(output / volume_file_name(key, normalization))
    return key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", type=Path, nargs="+")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the prepared set (added to)")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    manifests = [part / PREPARED_SET_FILE for part in args.parts if (part / PREPARED_SET_FILE).is_file()]
    manifest_file = manifests[-1] if manifests else args.output / PREPARED_SET_FILE  # an earlier unpack's
    manifest = json.loads(manifest_file.read_text())
    normalization = manifest["normalization"]
    files = sorted(f for part in args.parts for f in part.glob("*.npz.xz"))
    with ProcessPoolExecutor(max_workers=16) as pool:
        keys = list(pool.map(unpack_case, files, [args.output] * len(files), [normalization] * len(files)))
    if "packed_images" in manifest:
        manifest["unpacked_images"] = manifest.pop("packed_images")
    volumes = {name: args.output / volume_file_name(key, normalization) for name, key in manifest["cases"].items()}
    # Every case unpacked so far (this call's parts and an earlier call's): hashed as it now lies on disk.
    manifest["volume_sha256"] = {name: file_sha256(path) for name, path in volumes.items() if path.is_file()}
    tmp = args.output / f".{PREPARED_SET_FILE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, args.output / PREPARED_SET_FILE)
    print(f"{args.output}: {len(keys)} cases unpacked")


if __name__ == "__main__":
    main()
