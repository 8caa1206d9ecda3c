"""Fidelity with seeds drawn from a model's appearance prior against standard-normal codes, on its training cases.

Both sides run the same network on the same label maps; only the appearance code differs: for seed ``s``, the
seed's standard-normal draw (``style_code``, how every model drew until session 31) or that draw moved and shaped by
the model's recorded prior (``AppearancePrior.code``). The cases are a prepared set (``medsynth prepare``): label
maps and images as training saw them (cropped to the brain box, on the network's [-1, 1] scale); each contrast is
scored with ``MedSynthLib.evaluation.metrics.fidelity`` (z-scored in the brain, Gaussian SSIM, PSNR peak 8), in the
brain and in the tumour. These are the model's own training cases: an in-sample comparison of the two code
distributions, not a held-out score. Writes per case and seed the mean over the four contrasts (and each contrast's
brain SSIM), and a summary with paired differences and exact sign-flip p-values
(``MedSynthLib.study.statistics.paired_comparison``). ``--summarise REPORT`` computes the summary again from a
report's per-case scores without running the network.

    python benchmarks/appearance_prior_insample.py --set SET --model MODEL --seeds 0 1 2 --threads 2 -o OUT.json

The committed ``docs/benchmarks/appearance_prior_insample_spade27_ssim.json`` was written this way with
``--model medsynth-spade27-ssim`` (the default of sessions 30-34, no longer registered; in git history).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from MedSynthLib.evaluation.metrics import fidelity  # noqa: E402
from MedSynthLib.schema.labels import tumour_mask  # noqa: E402
from MedSynthLib.schema.volume_io import write_json  # noqa: E402
from MedSynthLib.synthesis.models import resolve_model  # noqa: E402
from MedSynthLib.synthesis.networks import style_code  # noqa: E402
from MedSynthLib.synthesis.synthesize import SynthesisEngine  # noqa: E402
from MedSynthLib.training.data import prepare_volume, read_prepared_set  # noqa: E402

CODES = ("standard_normal", "prior")


def summarise(per_case: dict[str, dict[str, dict]], seeds: list[int]) -> dict[str, dict]:
    """Prior minus standard normal, case by case: per metric and seed (and over the seeds' mean) the mean of each
    side, the paired difference, cases better, and the exact sign-flip p; per contrast over the seeds' mean."""
    from MedSynthLib.study.statistics import paired_comparison

    names = list(per_case)
    first_row = next(iter(per_case[names[0]].values()))
    modalities = list(first_row["brain_ssim_per_contrast"])

    def entry(side: dict[str, np.ndarray]) -> dict:
        comparison = paired_comparison(side["prior"], side["standard_normal"])
        return {"standard_normal": float(side["standard_normal"].mean()), "prior": float(side["prior"].mean()),
                "difference": comparison["mean_difference"], "prior_better": comparison["wins"],
                "cases": comparison["n"], "sign_flip_p": comparison["p"], "sign_flip_exact": comparison["p_exact"]}

    summary: dict[str, dict] = {}
    for metric in ("brain_ssim", "brain_psnr", "tumour_ssim"):
        for seed in [*seeds, "mean"]:
            keys = list(seeds) if seed == "mean" else [seed]
            summary[f"{metric}_seed_{seed}"] = entry({codes: np.array(
                [np.mean([per_case[n][f"{codes}_seed{s}"][metric] for s in keys]) for n in names]) for codes in CODES})
    for modality in modalities:
        summary[f"brain_ssim_{modality}_seed_mean"] = entry({codes: np.array(
            [np.mean([per_case[n][f"{codes}_seed{s}"]["brain_ssim_per_contrast"][modality] for s in seeds])
             for n in names]) for codes in CODES})
    return summary


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", type=Path, help="a prepared set of the model's training cases")
    parser.add_argument("--model", help="a model with an appearance prior")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--summarise", type=Path, metavar="REPORT",
                        help="compute the summary again from this report's per-case scores (no network run)")
    parser.add_argument("-o", "--output", required=True, type=Path)
    args = parser.parse_args()
    if args.summarise is not None:
        report = json.loads(args.summarise.read_text())
        report["summary"] = summarise(report["per_case"], report["seeds"])
        report["summary_command"] = " ".join(["python", *sys.argv])
        write_json(report, args.output, overwrite=True)
        return
    if args.set is None or args.model is None:
        parser.error("--set and --model are needed unless --summarise is given")
    torch.set_num_threads(args.threads)
    card = resolve_model(args.model)
    if card.appearance is None:
        raise SystemExit(f"{args.model}: the model records no appearance prior")
    normalization, sources = read_prepared_set(args.set)
    engine = SynthesisEngine(card, "cpu", "auto")
    per_case: dict[str, dict[str, dict]] = {}
    for source in sources:
        volume = prepare_volume(source.origin, source.prepared, normalization, source.key)
        labels, real = volume.labels, volume.images.astype(np.float32)
        brain, tumour = labels > 0, tumour_mask(labels)
        row = {}
        for codes in CODES:
            for seed in args.seeds:
                engine.synth.style = card.appearance.code(seed) if codes == "prior" else style_code(
                    seed, card.network.style_dim)
                synthetic = engine.synth.predict(labels)
                scores = [fidelity(real[c], synthetic[c], brain, {"tumour": tumour}) for c in range(len(real))]
                row[f"{codes}_seed{seed}"] = {
                    "brain_ssim": float(np.mean([s["brain"]["ssim"] for s in scores])),
                    "brain_psnr": float(np.mean([s["brain"]["psnr"] for s in scores])),
                    "tumour_ssim": float(np.mean([s["tumour"]["ssim"] for s in scores if "tumour" in s])),
                    "brain_ssim_per_contrast": dict(zip(card.modalities, (s["brain"]["ssim"] for s in scores)))}
        per_case[source.name] = row
        print(source.name, {k: round(v["brain_ssim"], 4) for k, v in row.items()}, flush=True)

    summary = summarise(per_case, args.seeds)
    report = {"command": " ".join(["python", *sys.argv]), "model": card.name, "model_sha256": card.sha256,
              "seeds": args.seeds, "in_sample": True, "summary": summary, "per_case": per_case}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(report, args.output, overwrite=True)
    for key, value in summary.items():
        print(key, {k: round(v, 4) if isinstance(v, float) else v for k, v in value.items()})


if __name__ == "__main__":
    main()
