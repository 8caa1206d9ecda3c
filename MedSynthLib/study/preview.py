"""A partial report of a ``medsynth study`` that has not finished, from its cached stages only.

A study on a CPU runs for days; its finished stages are JSON files (and arrays) in its work
folder.  This builds the study's report from what a copy of that folder already holds, and
computes nothing that costs: no GAN, synthesis or arm is run.  The stage results are found by
their content, not by their cache keys (the keys hash the code, and the running study's
code may be an older commit than this one): an arm result by its held-out cases and seed, the
baseline and fidelity by their held-out cases, the memorisation check and the synthetic
cases by the fold's training cases, the GAN by the model sha256 its synthetic cases record.

A work folder may hold the results of more than one cache version (another version of MedSynth or
other options left them beside the running study's).  Each result records the identity its key hashes
(:mod:`MedSynthLib.study.cache`), so, as a run reuses only results of its own key, this takes only results
made from the study's cases with the given config's options; of a fold's synthetic cases the newest; only
arms trained on those synthetic cases (or on cases identical to them, as a run reuses them), their
memorisation check, their GAN's fidelity; and of each stage across folds only the code version of its
newest result.  A result written before results recorded their identity is taken only where it is the
one candidate for its stage.  Every result left out is named on stderr, one line per fold and reason.

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
from typing import Any, Callable, Sequence

from .cache import WorkLock
from .segmenter import ARMS


def _read(path: Path) -> Any | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _jsons(folder: Path) -> list[tuple[Path, Any]]:
    found = [(p, _read(p)) for p in sorted(Path(folder).glob("*.json"))]
    return [(p, d) for p, d in found if isinstance(d, dict)]


def _recorded(data: dict[str, Any]) -> dict[str, Any] | None:
    record = data.get("cache")
    return record if isinstance(record, dict) else None


class _Notices:
    """What a preview left out of the work folder and why, one line per fold and reason."""

    def __init__(self, work: Path) -> None:
        self.work, self.lines = Path(work), {}

    def add(self, fold: int, reason: str, paths: Sequence[Path]) -> None:
        if paths:
            self.lines.setdefault((fold, reason), []).extend(
                Path(p).relative_to(self.work).as_posix() if Path(p).is_relative_to(self.work) else str(p)
                for p in paths)

    def text(self) -> list[str]:
        return [f"fold {fold}: ignored {len(paths)} cached result(s) {reason}: {', '.join(sorted(set(paths)))}"
                for (fold, reason), paths in sorted(self.lines.items())]


OTHER_OPTIONS = "made with other options or for other cases"
OLDER = "of an older cache version (another version of MedSynth or of the study's options; the newest is used)"
UNRECORDED = ("written before MedSynth recorded cache versions, beside another result for the same stage, so "
              "which one the study uses cannot be told")
OLDER_CODE = ("of another version of MedSynth (or number of torchrun processes) than the newest result of "
              "that stage in any fold")
OTHER_SYNTHETIC = "of other synthetic cases (or another GAN) than those the report uses"


def _pick(candidates: list[tuple[Path, dict[str, Any]]], fits: Callable[[dict[str, Any]], bool], fold: int,
          notices: _Notices, *, linked: Callable[[dict[str, Any]], bool] | None = None,
          unrecorded_ok: bool = True) -> dict[str, Any] | None:
    """The result of one stage (or one arm and seed) among those found by content.

    Of the results that record their cache identity, those that ``fits`` (made from the study's cases with its
    options) and are ``linked`` to the synthetic cases chosen count, and the newest of them is the study's: the
    others are of an older cache version.  A result without a record (an older MedSynth wrote it) is taken only
    where it is the one candidate (and ``unrecorded_ok``); beside others which version it is cannot be told.
    """
    recorded = [(p, d) for p, d in candidates if _recorded(d) is not None]
    unrecorded = [(p, d) for p, d in candidates if _recorded(d) is None]
    notices.add(fold, OTHER_OPTIONS, [p for p, d in recorded if not fits(d["cache"])])
    recorded = [(p, d) for p, d in recorded if fits(d["cache"])]
    if linked is not None:
        notices.add(fold, OTHER_SYNTHETIC, [p for p, d in recorded if not linked(d["cache"])])
        recorded = [(p, d) for p, d in recorded if linked(d["cache"])]
    if recorded:
        recorded.sort(key=lambda pd: float(pd[1]["cache"].get("written", 0.0)))
        notices.add(fold, OLDER, [p for p, _ in recorded[:-1] + unrecorded])
        return recorded[-1][1]
    if not unrecorded_ok:
        notices.add(fold, OTHER_SYNTHETIC, [p for p, _ in unrecorded])
        return None
    if len(unrecorded) == 1:
        return unrecorded[0][1]
    notices.add(fold, UNRECORDED, [p for p, _ in unrecorded])
    return None


def collect_fold(work: Path, fold: Any, seeds: list[list[int]] | dict[str, list[int]],
                 all_case_ids: Sequence[str], study: Any = None, notices: _Notices | None = None) -> dict[str, Any]:
    """What the work folder holds for one fold, found by content and checked against its cache identity.

    ``seeds[arm]`` are the arm's training seeds in order.  ``study`` (a prepared ``run._Study``) gives the
    identity each stage's result must record (its cases and options); without it only the links between
    results are checked (an arm or memorisation check of the synthetic cases chosen, fidelity of their GAN).
    Returns ``{"stages": {name: result or None}, "arms": {arm: [run or None per seed]}}``.
    """
    from .cache import matches
    from .run import SYNTHETIC_ARMS

    work = Path(work)
    notices = notices if notices is not None else _Notices(work)
    n = fold.index
    test, train = set(fold.test), set(fold.train)
    stages: dict[str, Any] = {"gan": None, "synthetic": None, "fidelity": None, "memorisation": None,
                              "baseline": None}

    def expected(method: str, *args: Any, ignore: Sequence[str] = ()) -> Callable[[dict[str, Any]], bool]:
        if study is None:
            return lambda record: True
        inputs, config, _ = getattr(study, method)(fold, *args)
        return lambda record: matches(record, inputs, config, ignore)

    real_ids = set(all_case_ids)
    found = []
    for index_path in sorted((work / "synthetic").glob("*/index.json")):
        index = _read(index_path)
        if not isinstance(index, dict) or not index.get("cases"):
            continue
        bases = {e.get("base") for e in index["cases"]} & real_ids
        if bases and bases <= train and not bases & test:
            found.append((index_path, index))
    index = _pick(found, expected("synthetic_identity", None, ignore=("model",)), n, notices)
    synthetic_key = synthetic_model = None
    if index is not None:
        synthetic_key = index.get("key")
        synthetic_model = next(iter({e.get("model_sha256") for e in index["cases"]}))
        stages["synthetic"] = {"key": synthetic_key, "folder": str(work / "synthetic" / str(synthetic_key)),
                               "count": len(index["cases"]), "provenance": index["cases"],
                               "seconds": index.get("seconds", 0.0), "cache": _recorded(index)}
    synthetic_recorded = index is not None and _recorded(index) is not None
    same_data = {synthetic_key, *(index or {}).get("same_data_as", [])}

    def of_synthetic(record: dict[str, Any]) -> bool:
        return index is None or record.get("inputs", {}).get("synthetic") in same_data

    stages["baseline"] = _pick(
        [(p, d) for p, d in _jsons(work / "baseline")
         if d.get("variants") and all(set(v.get("scores", {})) == test for v in d["variants"].values())],
        expected("baseline_identity"), n, notices)
    candidates = [(p, d) for p, d in _jsons(work / "fidelity") if set(d.get("cases", {})) == test]
    paths = {id(d): p for p, d in candidates}
    fidelity = _pick(candidates, expected("fidelity_identity", synthetic_model, ignore=("model",)), n, notices,
                     linked=lambda record: index is None or record.get("inputs", {}).get("model") == synthetic_model)
    if fidelity is not None:
        path = paths[id(fidelity)]
        stages["fidelity"] = dict(fidelity, synthetic_images={c: str(path.with_name(f"{path.stem}_{c}_synthetic.npy"))
                                                              for c in fold.test})
    stages["memorisation"] = _pick(
        [(p, d) for p, d in _jsons(work / "memorisation")
         if d.get("cases") and all(set(e.get("ncc_all", {})) == train for e in d["cases"])],
        expected("memorisation_identity", synthetic_key, ignore=("synthetic",)), n, notices,
        linked=lambda record: index is None or record.get("inputs", {}).get("synthetic") == synthetic_key,
        unrecorded_ok=not synthetic_recorded)
    given = study.inputs.gan_models.get(n) if study is not None else None
    if stages["synthetic"] is not None and given is not None:
        # A study given its GANs (gan_model) trains none: the one its synthetic cases were made by is the one given.
        if given.sha256 in {e.get("model_sha256") for e in stages["synthetic"]["provenance"]}:
            stages["gan"] = {"source": "given", "pattern": study.config.gan_model,
                             "train_seconds": round(float(given.config.get("training", {})
                                                          .get("training_seconds", 0.0)), 1),
                             "model_sha256": given.sha256}
    elif stages["synthetic"] is not None:
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
    by_slot: dict[tuple[str, int], list[tuple[Path, dict[str, Any]]]] = {}
    for path, data in _jsons(work / "arms"):
        arm = data.get("arm")
        if arm in seeds and set(data.get("scores", {})) == test and data.get("seed") in seeds[arm]:
            by_slot.setdefault((arm, data["seed"]), []).append((path, data))
    runs: dict[str, list[Any]] = {arm: [None] * len(seeds[arm]) for arm in seeds}
    for arm in seeds:
        for k, seed in enumerate(seeds[arm]):
            uses_synthetic = arm in SYNTHETIC_ARMS
            fits = expected("arm_identity", arm, seed, synthetic_key, ignore=("world", "synthetic"))
            runs[arm][k] = _pick(by_slot.get((arm, seed), []), fits, n, notices,
                                 linked=of_synthetic if uses_synthetic else None,
                                 unrecorded_ok=not (uses_synthetic and synthetic_recorded))
    return {"stages": stages, "arms": runs}


def _one_version(found: list[tuple[Any, Any, dict[str, Any]]], notices: _Notices, work: Path) -> None:
    """Across folds, keep of each stage only the results of the code version of its newest result (and, for the
    arms, its number of torchrun processes), as a run of the study would: another version's are dropped."""
    groups: dict[str, list[tuple[int, Callable[[], None], dict[str, Any], Path]]] = {}
    for fold, _, f in found:
        for name in ("synthetic", "fidelity", "memorisation", "baseline"):
            result = f["stages"][name] or {}
            if isinstance(result.get("cache"), dict):
                path = work / name / (str(result.get("key")) + ("" if name == "synthetic" else ".json"))
                groups.setdefault(name, []).append(
                    (fold.index, lambda f=f, name=name: f["stages"].__setitem__(name, None), result["cache"], path))
        for arm, runs in f["arms"].items():
            for k, run in enumerate(runs):
                if isinstance((run or {}).get("cache"), dict):
                    groups.setdefault("copy-paste arm" if arm == "real+copypaste" else "arm", []).append(
                        (fold.index, lambda runs=runs, k=k: runs.__setitem__(k, None), run["cache"],
                         work / "arms" / f"{run.get('key')}.json"))
    for entries in groups.values():
        newest = max(entries, key=lambda e: float(e[2].get("written", 0.0)))[2]
        version = (newest.get("code"), newest.get("inputs", {}).get("world"))
        for fold_index, drop, record, path in entries:
            if (record.get("code"), record.get("inputs", {}).get("world")) != version:
                drop()
                notices.add(fold_index, OLDER_CODE, [path])


def assemble(work: Path, folds: Sequence[Any], seeds_of: Any, all_case_ids: Sequence[str], study: Any = None,
             notices: _Notices | None = None) -> tuple[dict, dict]:
    """``results`` in the shape ``build_report`` reads (complete folds and arms only) and the ``partial`` record.

    ``seeds_of(fold, arm)`` gives the arm's seeds in that fold; ``study`` and ``notices`` as in ``collect_fold``.
    """
    notices = notices if notices is not None else _Notices(Path(work))
    found = []
    for fold in folds:
        seeds = {arm: seeds_of(fold, arm) for arm in ARMS}
        found.append((fold, seeds, collect_fold(work, fold, seeds, all_case_ids, study, notices)))
    _one_version(found, notices, Path(work))
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
    study.eta = _ETA(_Study.STAGE_KINDS, [])
    notices = _Notices(Path(work))
    with WorkLock(Path(work)):  # a study in this folder removes no superseded file while it is read
        study.prepare()
        results, partial = assemble(Path(work), inputs.folds, lambda fold, arm: [
            study._arm_seed(fold, arm, k) for k in range(config.seg_config.seeds)], [c.case_id for c in inputs.cases],
            study, notices)
    for line in notices.text():
        print(f"preview: {line}", file=sys.stderr)
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
