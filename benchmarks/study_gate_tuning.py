"""Tune the study's CPU segmenter against its gate, inside one training fold only.

The gate of ``medsynth study`` (issue 19): the real-only segmenter must beat the
FLAIR-threshold baseline.  Tuning on the held-out cases would leak, so this script
splits the *training* cases of the study's fold 1 (same seed and split as the study)
into an inner training and an inner validation part, fits the baseline and trains the
segmenter candidates on the inner training part, and scores both on the inner
validation part.  Cases are prepared through the study's own code into ``--work``
(the study run that follows reuses that preparation).

Usage::

    python benchmarks/study_gate_tuning.py --data DIR --work DIR --out results.json \
        --candidate name:patch_size=48,steps=400 [--candidate ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _parse_candidate(text: str) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    overrides: dict = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value)
    return name, overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", default="cpu")
    parser.add_argument("--inner-validation", type=int, default=6, help="inner validation cases (of fold 1's training)")
    parser.add_argument("--candidate", action="append", default=[], help="name:key=value,... over the config's segmenter")
    parser.add_argument("--seed", type=int, default=None, help="segmenter seed (default: the study seed)")
    args = parser.parse_args()

    import torch

    from MedSynthLib.study import baseline
    from MedSynthLib.study.run import _Dist, _Study, check_inputs, load_config
    from MedSynthLib.study.segmenter import Phase, SegConfig, evaluate_cases, score, train_segmenter

    config = load_config(args.config)
    torch.set_num_threads(int(config.threads or 2))
    inputs = check_inputs(args.data, args.work / "unused_report", config, extra_labels=None, device="cpu", folds=None,
                          overwrite=False)
    study = _Study(inputs, args.work, inputs.device, _Dist.from_env(), progress=False)
    t0 = time.perf_counter()
    study.prepare()
    prepare_seconds = time.perf_counter() - t0
    fold = inputs.folds[0]
    order = list(np.random.default_rng([config.seed, 19]).permutation(len(fold.train)))
    inner_val = sorted(fold.train[i] for i in order[:args.inner_validation])
    inner_train = sorted(fold.train[i] for i in order[args.inner_validation:])
    train_cases = [study.seg_real[c] for c in inner_train]
    val_cases = [study.seg_real[c] for c in inner_val]
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.update({"fold": fold.index, "held_out_test_cases_untouched": fold.test, "inner_train": inner_train,
                    "inner_validation": inner_val, "prepare_seconds": round(prepare_seconds, 1),
                    "grid_spacing_mm": study.grid.spacing, "grid_size": list(study.grid.size)})
    base = {}
    for variant in baseline.VARIANTS:
        fitted = baseline.fit(train_cases, variant)
        scores = {c.name: score(fitted.predict(c.images, c.labels), c.labels, c.spacing) for c in val_cases}
        base[variant] = {"fit": fitted.to_json(), "wt_dice": {k: v["WT"]["dice"] for k, v in scores.items()},
                         "wt_dice_mean": float(np.mean([v["WT"]["dice"] for v in scores.values()]))}
    results["baseline"] = base
    print(json.dumps({k: v["wt_dice_mean"] for k, v in base.items()}), flush=True)
    candidates = results.setdefault("candidates", {})
    for text in args.candidate:
        name, overrides = _parse_candidate(text)
        seg = dict(config.seg_config.to_json(), **overrides)
        cfg = SegConfig.from_json(seg, "candidate")
        seed = args.seed if args.seed is not None else config.seed
        t0, cpu0 = time.perf_counter(), time.process_time()
        model, info = train_segmenter([Phase("real", train_cases, 0, cfg.steps)], cfg, torch.device("cpu"), seed,
                                      progress=False)
        train_seconds = time.perf_counter() - t0
        train_cpu_seconds = time.process_time() - cpu0
        from dataclasses import replace

        # One trained model, scored with and without the largest-component post-processing.
        post = replace(cfg, largest_component=not cfg.largest_component)
        post_scores = evaluate_cases(model, val_cases, post, torch.device("cpu"))
        scores = evaluate_cases(model, val_cases, cfg, torch.device("cpu"))
        entry = {"overrides": overrides, "seed": seed, "train_seconds": round(train_seconds, 1),
                 "seconds_per_step": round(train_seconds / cfg.steps, 3),
                 # CPU seconds of this process (all its threads) per step: on 2 idle cores the wall time per step
                 # is about half of it; the wall time above depends on how loaded the machine was.
                 "cpu_seconds_per_step": round(train_cpu_seconds / cfg.steps, 3),
                 "eval_seconds": round(time.perf_counter() - t0 - train_seconds, 1),
                 "final_loss": info["final_loss"]}
        for region in ("WT", "TC", "ET"):
            entry[f"{region.lower()}_dice"] = {k: v[region]["dice"] for k, v in scores.items()}
            entry[f"{region.lower()}_dice_mean"] = float(np.mean([v[region]["dice"] for v in scores.values()]))
        entry["with_largest_component_" + str(post.largest_component).lower()] = {
            f"{region.lower()}_dice_mean": float(np.mean([v[region]["dice"] for v in post_scores.values()]))
            for region in ("WT", "TC", "ET")}
        entry["with_largest_component_" + str(post.largest_component).lower()]["wt_dice"] = {
            k: v["WT"]["dice"] for k, v in post_scores.items()}
        candidates[f"{name}/seed{seed}"] = entry
        args.out.write_text(json.dumps(results, indent=1))
        print(name, json.dumps({k: entry[k] for k in ("wt_dice_mean", "tc_dice_mean", "et_dice_mean",
                                                      "seconds_per_step", "cpu_seconds_per_step")}),
              json.dumps({k: v for k, v in entry.items() if k.startswith("with_")}), flush=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
