"""The SSIM map of ``medsynth evaluate``: MedSynth's separable filtering against MONAI's 3D convolution.

Both compute the same Gaussian-window SSIM (sigma 1.5 voxels, 11 taps, data range 8) on one real case's
z-scored contrasts, each pair of contrasts in the same run; prints the times, their ratio and how far the maps
and the brain means differ.

Usage (from the repository root)::

    python benchmarks/bench_ssim.py /path/to/BraTS2021_00006 [--threads 2] [-o result.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from MedSynthLib.cases.readers import read_case  # noqa: E402
from MedSynthLib.evaluation.evaluate import real_brain_mask  # noqa: E402
from MedSynthLib.evaluation.metrics import DATA_RANGE, SSIM_KERNEL, SSIM_SIGMA, ssim_map  # noqa: E402
from MedSynthLib.schema.grid import mask_box  # noqa: E402
from MedSynthLib.synthesis.normalize import zscore  # noqa: E402


def monai_ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The reference: MONAI's ``compute_ssim_and_cs`` on the same reflect-padded volumes."""
    from monai.metrics.regression import compute_ssim_and_cs

    pad = SSIM_KERNEL // 2
    ta = torch.from_numpy(np.pad(a, pad, mode="reflect"))[None, None]
    tb = torch.from_numpy(np.pad(b, pad, mode="reflect"))[None, None]
    with torch.no_grad():
        ssim, _ = compute_ssim_and_cs(ta, tb, 3, [SSIM_KERNEL] * 3, [SSIM_SIGMA] * 3, DATA_RANGE, "gaussian",
                                      0.01, 0.03)
    return ssim[0, 0].numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case", type=Path, help="a real case folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("-o", "--output", type=Path, help="also write the result as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    case = read_case(args.case)
    brain = real_brain_mask(case.images)
    box = mask_box(brain, SSIM_KERNEL)
    inside = brain[box]
    z = {m: zscore(image[box], inside).astype(np.float32) for m, image in case.images.items()}
    rows = []
    for a, b in (("t1", "t1ce"), ("t2", "flair")):
        started = time.perf_counter()
        ours = ssim_map(z[a], z[b])
        ours_s = time.perf_counter() - started
        started = time.perf_counter()
        reference = monai_ssim_map(z[a], z[b])
        monai_s = time.perf_counter() - started
        rows.append({"pair": f"{a}/{b}", "separable_s": round(ours_s, 3), "monai_s": round(monai_s, 3),
                     "ratio": round(ours_s / monai_s, 4),
                     "max_abs_difference": float(np.abs(ours - reference).max()),
                     "brain_mean_difference": float(ours[inside].mean() - reference[inside].mean())})
        print(f"{a}/{b}: separable {ours_s:.2f} s, MONAI {monai_s:.2f} s, ratio {ours_s / monai_s:.3f}; "
              f"max |difference| {rows[-1]['max_abs_difference']:.2e}, brain mean difference "
              f"{rows[-1]['brain_mean_difference']:.1e}")
    result = {"case": case.case_id, "box": list(z["t1"].shape), "threads": args.threads,
              "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "rows": rows}
    if args.output:
        args.output.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
