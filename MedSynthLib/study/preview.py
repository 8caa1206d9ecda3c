"""A partial report of a ``medsynth study`` that has not finished, from its cached stages only.

A study on a CPU runs for days; its finished stages are JSON files (and arrays) in its work
folder.  This builds the study's report from what a copy of that folder already holds, and
computes nothing that costs: no GAN, synthesis or arm is run.  The stage results are found by
their content, not by their cache keys (the keys hash the code, and the running study's
code may be an older commit than this one): an arm result by its held-out cases and seed, the
baseline and fidelity by their held-out cases, the memorisation check and the synthetic
cases by the fold's training cases, the GAN by the model sha256 its synthetic cases record.

A fold is included when its GAN, synthetic cases, fidelity, memorisation check and baseline
are all there; an arm when all its seeds are there in every included fold.  Everything left
out is listed in ``report["partial"]`` and in a banner at the top of ``report.md``.  From the
work folder of a finished study it builds the whole report (no banner) with this code's
statistics, whatever commit computed the stages.

Case preparation (cheap) is read from, or if missing written into, the given work folder,
so point it at a copy of a running study's work folder, never at the folder itself::

    cp -a WORK /tmp/work_copy
    python -m MedSynthLib.study.preview --data DATA --work /tmp/work_copy -o REPORT --config cpu \\
        [--extra-labels ...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .segmenter import ARMS


def _read(path: Path) -> Any | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _jsons(folder: Path) -> list[tuple[Path, Any]]:
    found = [(p, _read(p)) for p in sorted(Path(folder).glob("*.json"))]
    return [(p, d) for p, d in found if isinstance(d, dict)]


def collect_fold(work: Path, fold: Any, seeds: list[list[int]] | dict[str, list[int]],
                 all_case_ids: Sequence[str]) -> dict[str, Any]:
    """What the work folder holds for one fold, found by content.

    ``seeds[arm]`` are the arm's training seeds in order.  Returns ``{"stages": {name: result or None},
    "arms": {arm: [run or None per seed]}}``.
    """
    work = Path(work)
    test, train = set(fold.test), set(fold.train)
    stages: dict[str, Any] = {"gan": None, "synthetic": None, "fidelity": None, "memorisation": None,
                              "baseline": None}
    for _, data in _jsons(work / "baseline"):
        variants = data.get("variants", {})
        if variants and all(set(v.get("scores", {})) == test for v in variants.values()):
            stages["baseline"] = data
    for path, data in _jsons(work / "fidelity"):
        if set(data.get("cases", {})) == test:
            stages["fidelity"] = dict(data, synthetic_images={c: str(path.with_name(f"{path.stem}_{c}_synthetic.npy"))
                                                              for c in fold.test})
    for _, data in _jsons(work / "memorisation"):
        entries = data.get("cases", [])
        if entries and all(set(e.get("ncc_all", {})) == train for e in entries):
            stages["memorisation"] = data
    real_ids = set(all_case_ids)
    for index_path in sorted((work / "synthetic").glob("*/index.json")):
        index = _read(index_path)
        if not isinstance(index, dict) or not index.get("cases"):
            continue
        bases = {e.get("base") for e in index["cases"]} & real_ids
        if bases and bases <= train and not bases & test:
            stages["synthetic"] = {"key": index.get("key", index_path.parent.name), "folder": str(index_path.parent),
                                   "count": len(index["cases"]), "provenance": index["cases"],
                                   "seconds": index.get("seconds", 0.0)}
    if stages["synthetic"] is not None:
        wanted = {e.get("model_sha256") for e in stages["synthetic"]["provenance"]}
        for model_dir in sorted((work / "gan").glob("*/model")):
            if not (model_dir / "config.json").is_file():
                continue
            from ..synthesis.models import resolve_model

            model = resolve_model(model_dir)
            if model.sha256 in wanted:
                training = model.config.get("training", {})
                stages["gan"] = {"source": "trained", "key": model_dir.parent.name, "cached": True,
                                 "steps": training.get("steps"),
                                 "train_seconds": round(float(training.get("training_seconds", 0.0)), 1),
                                 "model_sha256": model.sha256}
    runs: dict[str, list[Any]] = {arm: [None] * len(seeds[arm]) for arm in seeds}
    for _, data in _jsons(work / "arms"):
        arm = data.get("arm")
        if arm in seeds and set(data.get("scores", {})) == test and data.get("seed") in seeds[arm]:
            runs[arm][seeds[arm].index(data["seed"])] = data
    return {"stages": stages, "arms": runs}


def assemble(work: Path, folds: Sequence[Any], seeds_of: Any, all_case_ids: Sequence[str]) -> tuple[dict, dict]:
    """``results`` in the shape ``build_report`` reads (complete folds and arms only) and the ``partial`` record.

    ``seeds_of(fold, arm)`` gives the arm's seeds in that fold.
    """
    found = []
    for fold in folds:
        seeds = {arm: seeds_of(fold, arm) for arm in ARMS}
        found.append((fold, seeds, collect_fold(work, fold, seeds, all_case_ids)))
    included = [(fold, seeds, f) for fold, seeds, f in found if all(v is not None for v in f["stages"].values())]
    complete_arms = [arm for arm in ARMS
                     if included and all(all(r is not None for r in f["arms"][arm]) for _, _, f in included)]
    results: dict[str, Any] = {"folds": []}
    for fold, seeds, f in included:
        s = f["stages"]
        arms = {}
        for arm in complete_arms:
            runs = f["arms"][arm]
            arms[arm] = {"arm": arm, "seeds": seeds[arm], "runs": runs, "finetune_cases": runs[0].get("finetune_cases"),
                         "real_cases": runs[0].get("real_cases"), "training": runs[0].get("training", {}),
                         "copy_paste_cases": runs[0].get("copy_paste_cases"),
                         "seconds": round(sum(r.get("seconds", 0.0) for r in runs), 2)}
        results["folds"].append({"fold": fold.index, "test": fold.test, "train": fold.train, "gan": s["gan"],
                                 "baseline": s["baseline"], "synthetic": s["synthetic"], "fidelity": s["fidelity"],
                                 "memorisation": s["memorisation"], "arms": arms})
    partial = {
        "note": (f"Built from the cached stages of a running study: {len(included)} of {len(folds)} fold(s) and "
                 f"{len(complete_arms)} of {len(ARMS)} learned arms (those with every seed in every included "
                 "fold) are in the tables; n counts only the included folds' held-out cases, and the Split row "
                 "counts only the included folds. The Git commit row names the code that built this report; the "
                 "stages were computed by the running study's own code."),
        "complete": len(included) == len(folds) and len(complete_arms) == len(ARMS),
        "seeds": max((len(v) for _, seeds, _ in found for v in seeds.values()), default=0),
        "arms_included": complete_arms,
        "folds": [{"fold": fold.index, "included": any(fold is g for g, _, _ in included),
                   "stages": {k: v is not None for k, v in f["stages"].items()},
                   "arms_seeds_done": {arm: sum(r is not None for r in runs) for arm, runs in f["arms"].items()}}
                  for fold, _, f in found],
    }
    return results, partial


def preview(data: Path, work: Path, report_dir: Path, config: Any, *, extra_labels: list[Path] | None = None,
            overwrite: bool = False, command: str = "") -> dict[str, Any]:
    """Write a partial report of the study whose (copied) work folder is ``work``; returns the report."""
    from .report import build_report, write_report
    from .run import _ETA, _Dist, _Study, check_inputs

    started = time.perf_counter()
    started_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    inputs = check_inputs(Path(data), Path(report_dir), config, extra_labels=extra_labels, device="cpu",
                          folds=None, overwrite=overwrite)
    study = _Study(inputs, Path(work), inputs.device, _Dist(0, 1, 0), False)
    study.eta = _ETA(_Study.STAGE_WEIGHTS, [])
    study.prepare()
    results, partial = assemble(Path(work), inputs.folds, lambda fold, arm: [
        study._arm_seed(fold, arm, k) for k in range(config.seg_config.seeds)], [c.case_id for c in inputs.cases])
    if not results["folds"]:
        from ..schema.errors import MedSynthError

        raise MedSynthError(f"{work}: no fold has its GAN, synthetic cases, fidelity, memorisation and baseline yet")
    for f in results["folds"]:
        tag = f"fold {f['fold']}/{len(inputs.folds)}"
        study.timings[f"{tag} GAN"] = f["gan"]["train_seconds"]
        for name in ("synthetic", "fidelity", "memorisation", "baseline"):
            study.timings[f"{tag} {name}"] = float(f[name].get("seconds", 0.0))
        for arm, entry in f["arms"].items():
            for k, run in enumerate(entry["runs"]):
                study.timings[f"{tag} arm {arm} seed {k + 1}"] = float(run.get("seconds", 0.0))
        for name in list(study.timings):
            study.computed.setdefault(name, False)
    report = build_report(inputs, results, study, command=command or "python -m MedSynthLib.study.preview",
                          started_utc=started_utc, wall_seconds=time.perf_counter() - started)
    # A finished study's cache gives the whole report, built by this code (no banner).
    report["partial"] = None if partial["complete"] else partial
    write_report(report, results, study, Path(report_dir), overwrite=overwrite)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import shlex

    from ..schema.errors import MedSynthError
    from .config import load_config

    parser = argparse.ArgumentParser(prog="python -m MedSynthLib.study.preview",
                                     description="Report of a medsynth study (partial while it runs) from a COPY of "
                                                 "its work folder (cached stages only; nothing is trained).")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True, help="a copy of the study's work folder")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--extra-labels", type=Path, nargs="*")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        command = " ".join(shlex.quote(a) for a in ["python", "-m", "MedSynthLib.study.preview",
                                                    *(argv or sys.argv[1:])])
        report = preview(args.data, args.work, args.output, load_config(args.config),
                         extra_labels=args.extra_labels, overwrite=args.overwrite, command=command)
    except MedSynthError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{'partial report' if report.get('partial') else 'report'} written to {args.output}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
