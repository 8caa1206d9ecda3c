"""``medsynth study``: the experiments of Shin et al. 2018 on the user's own data, in one command.

For each fold (cases split by case, k-fold or a fixed split, seeded):

1. the synthesis GAN is trained on the fold's training cases only
   (:func:`MedSynthLib.training.train.train`, sharing one cache of prepared cases), or a
   given model is used;
2. synthetic label maps are made from the training cases' label maps with
   random tumour edits (moved / resized / rotated / flipped, tumours of other
   training cases or of extra tumour label maps inserted into training brains,
   training tumours inserted into the healthy ICBM152 template), every edit
   recorded, and synthesised with the fold's GAN;
3. the FLAIR-threshold baseline (:mod:`MedSynthLib.study.baseline`) is fitted on the
   training cases, and a tumour segmenter (:mod:`MedSynthLib.study.segmenter`) is trained
   in every arm with several seeds and the same step budget: real only; real + synthetic
   (real patches of arm 1 kept, synthetic added on top); synthetic only; synthetic then
   fine-tuned on 10 % of the real cases; the class-mean painted control; the copy-paste
   control (real tumours pasted into other real training brains,
   :mod:`MedSynthLib.study.copypaste`); the learning curve on 25 / 50 % of the real cases;
4. every arm is scored on the held-out real cases (Dice, HD95 for WT/TC/ET), the GAN's
   fidelity is measured on the held-out cases (their real label maps -> synthetic images
   vs their real images), and every synthetic case is compared with its most similar
   training case.

Every stage is cached in the work folder under a key that hashes the
configuration and data it depends on (the arms and the baseline also the source of their
modules, :mod:`MedSynthLib.study.stages`), so an interrupted study resumes where it
stopped and a finished one re-reports instantly.  The report folder is written
atomically at the end (:mod:`MedSynthLib.study.report`); then the older versions of the
stage results this run used (made with its options by other code, GAN weights or synthetic
cases) are removed, unless another process holds the folder; results of other options stay
(:mod:`MedSynthLib.study.cache`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..schema.errors import InputError, MedSynthError
from ..schema.labels import tumour_mask
from ..schema.volume_io import check_writable, write_json
from ..training.train import Dist
from .cache import WorkLock, cache_record, remove, superseded
from .config import CONFIG_NAMES, StudyConfig, configs_root, load_config  # noqa: F401  (re-exported)
from .data import (PREP_VERSION, STUDY_VERSION, CaseInfo, ExtraTumour, RealCase, StudyGrid,
                   sha256_json)
from .segmenter import ARMS, SegCase
from .stages import stage_key

# The learned arms that train on the fold's synthetic cases (their results depend on which ones).
SYNTHETIC_ARMS = ("real+synthetic", "synthetic", "synthetic+finetune", "real+classmean")


# --- distributed (torchrun) --------------------------------------------------------------------


@dataclass
class _Dist(Dist):
    """The torchrun rank of a study process (the group itself is joined on demand)."""

    @classmethod
    def from_env(cls) -> "_Dist":
        return cls(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                   int(os.environ.get("LOCAL_RANK", "0")))

    def sync(self, device_type: str) -> None:
        """Barrier (the process group is joined on demand and left before GAN training)."""
        if self.world <= 1:
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        dist.barrier()

    @contextmanager
    def shared_group(self, device_type: str) -> Iterator[None]:
        """Let :func:`MedSynthLib.training.train.train` run in the study's process group.

        ``train()`` joins a process group when launched by torchrun and leaves it at
        its end; the study calls it once per fold, and leaving and re-joining a gloo
        group repeatedly races on the rendezvous store.  So for the duration of the
        call ``train()`` is handed the existing group and its leaving is a no-op.
        """
        if self.world <= 1:
            yield
            return
        import torch
        import torch.distributed as dist

        from ..training import train as train_module

        self.sync(device_type)
        original_init, original_destroy = train_module.init_distributed, dist.destroy_process_group

        def join(kind: str) -> Any:
            if kind == "cuda":
                torch.cuda.set_device(self.local_rank)
            return train_module.Dist(self.rank, self.world, self.local_rank)

        train_module.init_distributed = join  # type: ignore[assignment]
        dist.destroy_process_group = lambda *args, **kwargs: None  # type: ignore[assignment]
        try:
            yield
        finally:
            train_module.init_distributed = original_init  # type: ignore[assignment]
            dist.destroy_process_group = original_destroy  # type: ignore[assignment]

    def release(self) -> None:
        if self.world <= 1:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# --- small helpers -----------------------------------------------------------------------------


def _log(message: str) -> None:
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 speaks for all
        return
    print(f"medsynth study: {message}", file=sys.stderr, flush=True)


def _fmt_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def _write_json_atomic(data: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(data, path, overwrite=True)


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass
class Fold:
    index: int  # 1-based
    test: list[str]
    train: list[str]


def make_folds(case_ids: list[str], k: int, seed: int, test_cases: list[str] | None, data: Path) -> list[Fold]:
    """Split by case: seeded k-fold (near-equal test groups), or one fixed split."""
    if test_cases:
        unknown = sorted(set(test_cases) - set(case_ids))
        if unknown:
            raise InputError(data, f"test cases {unknown} are not among the case folders")
        train = [c for c in case_ids if c not in test_cases]
        if not train:
            raise InputError(data, "no training case left after holding out the test cases")
        return [Fold(1, sorted(test_cases), train)]
    if len(case_ids) < k:
        raise InputError(data, f"{len(case_ids)} case(s) cannot be split into {k} folds "
                               f"(need at least {k} cases; use --folds with a smaller number)")
    order = list(np.random.default_rng(seed).permutation(len(case_ids)))
    groups = [sorted(case_ids[i] for i in order[f::k]) for f in range(k)]
    return [Fold(f + 1, groups[f], [c for c in case_ids if c not in groups[f]]) for f in range(k)]


class _ETA:
    """Remaining time, each kind of stage estimated from the stages of that kind timed so far.

    The kinds do not cost one another in a fixed ratio: on five real BraTS cases on 2 cores the micro config
    spends 2 min preparing them and 7-25 s on each 4-step arm, while the paper config's arms train for hours.
    So no kind is guessed from another: until every kind still ahead has been timed the line says what the
    estimate waits for.  A stage taken from the cache is timed by the seconds its result records (an interrupted
    study resumes in plan order, so what is ahead of it still has to run); no estimate is given before this run
    has computed a stage (a finished study rerun is cached throughout).
    """

    def __init__(self, kinds: dict[str, str | None], plan: list[str]) -> None:
        # kinds: what the estimate waits for before a kind is timed; None for a kind that costs nothing
        self.kinds, self.plan, self.done = kinds, list(plan), 0
        self.timed: dict[str, list[float]] = {k: [0.0] for k, what in kinds.items() if what is None}
        self.computed = False

    def finish(self, kind: str, seconds: float, computed: bool) -> str:
        self.done += 1
        self.computed = self.computed or computed
        if self.kinds.get(kind, "") is not None:
            self.timed.setdefault(kind, []).append(float(seconds))
        progress = f"{self.done}/{len(self.plan)} stages"
        ahead = self.plan[self.done:]
        if not self.computed:
            return progress
        untimed = [k for k in ahead if k not in self.timed]
        if untimed:  # named: the one whose first stage comes last; once it is done, all of them are
            waits_for = max(dict.fromkeys(untimed), key=ahead.index)
            return f"{progress}, ETA unknown until {self.kinds.get(waits_for) or f'a {waits_for} stage is done'}"
        left = sum(float(np.mean(self.timed[k])) for k in ahead)
        return f"{progress}, ETA {_fmt_seconds(left)}"


# --- the study ---------------------------------------------------------------------------------


@dataclass
class StudyInputs:
    """Everything checked before any work is done."""

    data: Path
    cases: list[CaseInfo]
    folds: list[Fold]
    extras: list[ExtraTumour]
    extra_files: list[Path]
    gan_models: dict[int, Any]
    device: Any
    config: StudyConfig


def check_inputs(data: Path, report_dir: Path, config: StudyConfig, *, extra_labels: list[Path] | None,
                 device: str, folds: int | None, overwrite: bool) -> StudyInputs:
    """Every bad-input check of the study, before anything is written."""
    from ..cases.readers import detect_convention
    from ..synthesis.inference import pick_device, pick_precision
    from ..training.data import find_case_folders
    from .data import find_label_files, inspect_case, load_extra_tumour

    check_writable([report_dir], overwrite)
    dev = pick_device(device)
    precision = config.synthetic.get("precision", "auto")
    try:  # the synthesis stage runs after the GANs have trained: a precision this device lacks is refused now
        pick_precision(precision, dev)
    except MedSynthError as exc:
        raise MedSynthError(f"synthetic.precision {precision!r}: {exc}") from None
    folders = find_case_folders(data)
    conventions: dict[str, list[str]] = {}
    for folder in folders:
        conventions.setdefault(detect_convention(folder), []).append(folder.name)
    if len(conventions) > 1:
        listing = "; ".join(f"{name}: {', '.join(ids[:4])}{' ...' if len(ids) > 4 else ''}"
                            for name, ids in sorted(conventions.items()))
        raise InputError(data, f"cases of mixed conventions ({listing}); a study needs every case in one "
                               "convention (convert or move the odd ones out)")
    names = [f.name for f in folders]
    if len(set(names)) != len(names):
        raise InputError(data, "two case folders share a name; case ids must be unique")
    if folds is not None:
        config.folds = int(folds)
        config.test_cases = None
        if config.folds < 2:
            raise InputError(data, f"--folds {folds}: at least 2 folds")
    # Fold check first: it needs the names only, and reading cases takes time.
    split = make_folds(sorted(names), config.folds, config.seed, config.test_cases, data)
    cases = [inspect_case(folder)[0] for folder in folders]
    by_id = {c.case_id: c for c in cases}
    for fold in split:
        tumour = sum(sum(by_id[c].tumour_voxels.values()) for c in fold.train)
        if tumour == 0:
            raise MedSynthError(f"{data}: fold {fold.index}: the real training cases ({', '.join(fold.train)}) hold "
                                "no tumour voxel, so the segmentation arms would have no tumour to learn")
    extra_files = find_label_files(extra_labels or [])
    extras = [load_extra_tumour(p, config.extra_label_convention, float(config.grid["spacing_mm"]))
              for p in extra_files]
    # A label map of a real case's patient (brats_more: three patients are also in brats2020_seg) stays on
    # that patient's side of every split: it is used only in folds that train on the patient.
    for extra in extras:
        extra.patients = tuple(sorted(c.case_id for c in cases if c.tumour_sha256 == extra.tumour_sha256))
    gan_models = {fold.index: _check_gan_model(config.gan_model, fold) for fold in split} if config.gan_model else {}
    return StudyInputs(Path(data), sorted(cases, key=lambda c: c.case_id), split, extras, extra_files, gan_models,
                       dev, config)


def _check_gan_model(pattern: str, fold: Fold) -> Any:
    """A given GAN must exist, verify, and fit the study (7 label classes in, 4 modalities out)."""
    from ..schema.labels import NUM_CLASSES
    from ..synthesis.models import resolve_model
    from ..synthesis.networks import MODALITY_ORDER

    text = pattern.replace("{fold}", str(fold.index))
    model = resolve_model(text)  # the card: network and normalisers parsed and checked once
    network = model.network
    if network.in_channels != NUM_CLASSES or model.modalities != MODALITY_ORDER or \
            set(model.normalizers) != set(MODALITY_ORDER):
        raise InputError(model.path, f"incompatible GAN checkpoint: it maps {network.in_channels} label classes "
                                     f"to {list(network.modalities)}, the study needs {NUM_CLASSES} classes to "
                                     f"{list(MODALITY_ORDER)}")
    return model


def run_study(data: Path, report_dir: Path, config: StudyConfig, *, extra_labels: list[Path] | None = None,
              work: Path | None = None, device: str = "auto", folds: int | None = None, overwrite: bool = False,
              command: str = "", progress: bool = True) -> dict[str, Any]:
    """Run (or resume) a study and write its report folder; returns the report dictionary."""
    import torch

    started = time.perf_counter()
    started_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    d = _Dist.from_env()
    report_dir = Path(report_dir)
    inputs = check_inputs(Path(data), report_dir, config, extra_labels=extra_labels, device=device, folds=folds,
                          overwrite=overwrite or d.rank > 0)
    dev = inputs.device
    if d.world > 1 and config.seg_config.engine == "nnunetv2":
        raise MedSynthError("the nnunetv2 segmenter engine trains each arm in one nnU-Net process of its own; "
                            "run this study without torchrun")
    if d.world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", d.local_rank)
    if config.threads:
        torch.set_num_threads(int(config.threads))
    work = Path(work) if work is not None else report_dir.with_name(report_dir.name + ".cache")
    if work.resolve() == report_dir.resolve() or report_dir.resolve() in work.resolve().parents:
        raise InputError(work, "the work folder must lie outside the report folder")
    if d.main:
        work.mkdir(parents=True, exist_ok=True)
    _log(f"{len(inputs.cases)} cases, {len(inputs.folds)} fold(s), config {config.name}, device {dev}, "
         f"work folder {work}")
    study = _Study(inputs, work, dev, d, progress)
    from .report import build_report, write_report

    # Rank 0 holds the work folder for the whole run (under torchrun it speaks for every rank).
    with WorkLock(work) if d.main else _no_lock() as lock:
        try:
            results = study.run()
            report = build_report(inputs, results, study, command=command, started_utc=started_utc,
                                  wall_seconds=time.perf_counter() - started)
            if d.main:
                write_report(report, results, study, report_dir, overwrite=overwrite)
        except KeyboardInterrupt:  # Ctrl-C (or SIGTERM): what is kept, and how to go on from it
            eta = getattr(study, "eta", None)
            done = f" after {eta.done} of {len(eta.plan)} stages" if eta is not None else ""
            again = "the same torchrun command" if d.world > 1 else "the same command"
            _log(f"interrupted{done}; the finished work is kept in {work}: {again} resumes from there")
            raise
        if d.main:
            _log(f"report written to {report_dir} in {_fmt_seconds(time.perf_counter() - started)}")
            _remove_superseded(work, study.used, lock)
    d.sync(dev.type)
    d.release()
    return report


@contextmanager
def _no_lock() -> Iterator[None]:
    yield None


def _remove_superseded(work: Path, used: dict[str, dict[str, dict[str, Any]]], lock: WorkLock) -> None:
    """Remove the older versions of the stage results this finished run used (made with the same options by
    other code, GAN weights or synthetic cases), unless another process holds the work folder; results of other
    options stay (another config's study may use the folder).  One line, none when there is nothing to say."""
    from collections import Counter

    def counted(results: list[tuple[str, str, list[Path]]], what: str) -> str:
        counts = ", ".join(f"{folder}: {n}" for folder, n in Counter(folder for folder, _, _ in results).items())
        return f"{len(results)} cached result(s) {what} ({counts})"

    with lock.alone() as alone:
        old, unknown = superseded(work, used)
        if not old and not unknown:
            return
        kept = (f"kept {counted(unknown, 'that do not record which options made them')} (written by an older "
                "MedSynth, or an unfinished arm training; a study of other options may need them)") if unknown else ""
        if not old:
            _log(f"{kept} in {work}")
            return
        what = counted(old, "of older cache versions")
        if not alone:
            _log(f"kept {what} in {work}: another process (a study, preview or records save) holds the work folder"
                 + (f"; {kept}" if kept else ""))
            return
        freed = remove([path for _, _, paths in old for path in paths])
    _log(f"removed {what} from {work}, {freed / 2 ** 20:.1f} MiB: this run made their stages anew with the same "
         "options" + (f"; {kept}" if kept else ""))


class _Study:
    """The stages of a study with their caches."""

    # The kinds of stages (see _ETA): what the ETA waits for until one of the kind is timed; None costs nothing.
    STAGE_KINDS: dict[str, str | None] = {
        "prepare": "the cases are prepared", "gan": "a GAN has trained", "given-gan": None,
        "synth": "synthetic cases are made", "fidelity": "a fidelity stage is done",
        "memo": "a memorisation check is done", "baseline": "a baseline is fitted", "arm": "an arm has trained"}

    def __init__(self, inputs: StudyInputs, work: Path, device: Any, d: _Dist, progress: bool) -> None:
        self.inputs, self.work, self.device, self.d, self.progress = inputs, work, device, d, progress
        self.config = inputs.config
        self.timings: dict[str, float] = {}
        self.computed: dict[str, bool] = {}
        self.grid: StudyGrid | None = None
        self.template_info: dict[str, Any] | None = None
        self.sha: dict[str, str] = {}
        self.folders: dict[str, Path] = {}
        self.labelmaps: dict[str, Any] = {}
        self._real_cache: dict[str, RealCase] = {}
        self.seg_real: dict[str, SegCase] = {}
        # The key and cache record of every stage result this run used, by stage folder (what it supersedes).
        self.used: dict[str, dict[str, dict[str, Any]]] = {}

    # ---- stage bookkeeping
    def _stage_done(self, name: str, kind: str, seconds: float, computed: bool) -> None:
        self.timings[name] = round(seconds, 2)
        self.computed[name] = computed
        eta = self.eta.finish(kind, seconds, computed)
        verb = "done" if computed else "cached"
        _log(f"{name}: {verb} ({_fmt_seconds(seconds)}); {eta}")

    # ---- preparation
    def prepare(self) -> None:
        from ..schema.grid import LabelMap
        from .data import write_study_case
        from .segmenter import make_seg_case

        start = time.perf_counter()
        cfg = self.config.grid
        extents = [c.extent_mm for c in self.inputs.cases]
        self.grid = StudyGrid.fit(extents, float(cfg["spacing_mm"]), float(cfg["margin_mm"]),
                                  int(cfg["size_multiple"]), cfg.get("box_mm"))
        from ..schema.budget import check_voxels

        check_voxels(f"study grid at {self.grid.spacing:g} mm", self.grid.size, "the grid")
        grid_key = sha256_json({"grid": self.grid.to_json(), "prep": PREP_VERSION})[:12]
        self.prepared_cache = self.work / "prepared"
        arrays = self.work / "arrays" / grid_key
        computed = False
        for info in self.inputs.cases:
            self.sha[info.case_id] = info.sha256
            self.folders[info.case_id] = self.work / "cases" / grid_key / info.case_id
        from tqdm import tqdm

        # Rank 0 prepares every case (tens of seconds each for real scans: resampling, the anatomy), the others wait.
        todo = self.inputs.cases if self.d.main else []
        with tqdm(todo, desc="prepare", unit="case", file=sys.stderr,
                  disable=not (self.progress and self.d.main) or None, leave=False) as bar:
            for info in bar:
                folder = self.folders[info.case_id]
                marker = _read_json(folder / "study_case.json")
                if marker is None or marker.get("source_sha256") != info.sha256:
                    from ..cases.readers import read_case

                    write_study_case(read_case(info.folder, require_segmentation=True), info, self.grid, folder)
                    computed = True
                stem = arrays / f"{info.sha256[:24]}"
                paths = (Path(f"{stem}_images.npy"), Path(f"{stem}_labels.npy"))
                if not all(p.exists() for p in paths):
                    real = self.real_case(info.case_id)
                    seg = make_seg_case(info.case_id, real.images, real.labelmap.array, real.labelmap.grid.spacing)
                    _mkdir(arrays)
                    for path, array in zip(paths, (seg.images.astype(np.float16), seg.labels)):
                        tmp = path.with_name(path.name + ".tmp.npy")
                        np.save(tmp, array)
                        os.replace(tmp, path)
                    computed = True
        self.d.sync(self.device.type)
        spacing = (self.grid.spacing,) * 3
        for info in self.inputs.cases:
            stem = arrays / f"{info.sha256[:24]}"
            seg = self._load_arrays(Path(f"{stem}_images.npy"), Path(f"{stem}_labels.npy"), info.case_id, spacing)
            self.seg_real[info.case_id] = seg
            self.labelmaps[info.case_id] = LabelMap(np.asarray(seg.labels), self.grid.grid_at(info.centre_lps))
        self.extras = self.inputs.extras
        kinds = self.config.synthetic.get("kinds", [])
        self.template = None
        if "template" in kinds:
            from .data import template_on_study_grid

            mean_extent = np.mean(np.stack(extents), axis=0)
            self.template, self.template_info = template_on_study_grid(self.grid, mean_extent)
        self.real_similarity = self._real_similarity()
        _log(f"prepared {len(self.seg_real)} cases on a {self.grid.spacing:g} mm grid of {self.grid.size} voxels")
        self._stage_done("prepare", "prepare", time.perf_counter() - start, computed)

    def real_case(self, case_id: str) -> RealCase:
        """The real case on its study grid, in scanner units (read on demand)."""
        from .data import load_study_case

        if case_id not in self._real_cache:
            real = load_study_case(self.folders[case_id], case_id, self.sha[case_id], self.prepared_cache)
            if not self.config.preload:
                return real
            self._real_cache[case_id] = real
        return self._real_cache[case_id]

    def _load_arrays(self, images_path: Path, labels_path: Path, name: str, spacing: tuple[float, ...]) -> SegCase:
        mode = None if self.config.preload else "r"
        images = np.load(images_path, mmap_mode=mode)
        labels = np.load(labels_path)
        if self.config.preload:
            images = images.astype(np.float32)
        return SegCase(name, images, labels, tuple(spacing))  # type: ignore[arg-type]

    def _real_similarity(self) -> dict[str, Any]:
        from .report import ncc

        ids = sorted(self.seg_real)
        pairs = [(a, b) for i, a in enumerate(ids) for b in ids[i + 1:]]
        limit = int(self.config.memorisation.get("max_real_pairs", 2000))
        if len(pairs) > limit:
            rng = np.random.default_rng(self.config.seed)
            pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), limit, replace=False))]
        values = [{"a": a, "b": b, "ncc": ncc(self.seg_real[a], self.seg_real[b])} for a, b in pairs]
        return {"pairs": values, "sampled": len(pairs) < len(ids) * (len(ids) - 1) // 2}

    # ---- the folds
    def run(self) -> dict[str, Any]:
        folds = self.inputs.folds
        self.eta = _ETA(self.STAGE_KINDS, self.stage_plan())
        self.prepare()
        results: dict[str, Any] = {"folds": []}
        for fold in folds:
            results["folds"].append(self.run_fold(fold))
        return results

    def stage_plan(self) -> list[str]:
        """The kind of every stage, in the order they run."""
        plan = ["prepare"]  # a stage like the others: the progress and the report count the same stages
        for fold in self.inputs.folds:
            plan += ["given-gan" if fold.index in self.inputs.gan_models else "gan", "synth", "fidelity", "memo",
                     "baseline"] + ["arm"] * (len(ARMS) * self.config.seg_config.seeds)
        return plan

    def _gan(self, fold: Fold) -> Any:
        from ..synthesis.models import resolve_model
        from ..training.train import train
        from .data import link_cases

        if fold.index in self.inputs.gan_models:
            return self.inputs.gan_models[fold.index], {"source": "given", "pattern": self.config.gan_model}
        config = self.config.train_config
        key = stage_key({"train": [self.sha[c] for c in fold.train], "grid": self.grid.to_json(),
                         "prep": PREP_VERSION, "v": STUDY_VERSION}, config.to_json(), self.GAN_MODULES)
        run_dir = self.work / "gan" / key
        model_dir = run_dir / "model"
        info = {"source": "trained", "key": key, "steps": config.steps}
        if (model_dir / "config.json").exists():
            return resolve_model(model_dir), dict(info, cached=True)
        resume = (run_dir / "checkpoints" / "latest.json").exists()
        if self.d.main and run_dir.exists() and not resume:
            shutil.rmtree(run_dir)
        self.d.sync(self.device.type)
        data_dir = self.work / "gan" / f"{key}.data"
        if self.d.main:
            link_cases([self.real_folder(c) for c in fold.train], data_dir)
        _log(f"fold {fold.index}: training the GAN on {len(fold.train)} case(s), {config.steps} steps"
             + (" (resumed)" if resume else ""))
        with self.d.shared_group(self.device.type):
            train(data_dir, run_dir, config, resume=resume, device=str(self.device), progress=self.progress,
                  command=f"medsynth study (fold {fold.index})", cache_dir=self.prepared_cache)
        self.d.sync(self.device.type)
        return resolve_model(model_dir), dict(info, cached=False)

    def fold_extras(self, fold: Fold) -> list[ExtraTumour]:
        """The extra tumour label maps a fold may use: none of a held-out patient's."""
        return [e for e in self.extras if not set(e.patients) & set(fold.test)]

    def real_folder(self, case_id: str) -> Path:
        return self.folders[case_id]

    def run_fold(self, fold: Fold) -> dict[str, Any]:
        tag = f"fold {fold.index}/{len(self.inputs.folds)}"
        t0 = time.perf_counter()
        model, gan_info = self._gan(fold)
        computed = not gan_info.get("cached", True)
        seconds = time.perf_counter() - t0
        if not computed:  # report the time the cached model took to train
            seconds = float(model.config.get("training", {}).get("training_seconds", 0.0))
        gan_info["train_seconds"] = round(float(model.config.get("training", {}).get("training_seconds", 0.0)), 1)
        self._stage_done(f"{tag} GAN", "given-gan" if gan_info["source"] == "given" else "gan", seconds, computed)
        gan_info.update({"model_sha256": model.sha256})
        engine = None

        def get_engine():
            nonlocal engine
            if engine is None:
                from ..synthesis.synthesize import SynthesisEngine

                engine = SynthesisEngine(model, str(self.device), self.config.synthetic.get("precision", "fp32"))
            return engine

        synth = self._synthetic(fold, model, get_engine, tag)
        fidelity = self._fidelity(fold, model, get_engine, tag)
        memo = self._memorisation(fold, synth, tag)
        baseline = self._baseline(fold, tag)
        arms = {arm: self._arm(fold, arm, synth, tag) for arm in ARMS}
        return {"fold": fold.index, "test": fold.test, "train": fold.train, "gan": gan_info, "baseline": baseline,
                "synthetic": {k: v for k, v in synth.items() if k != "cases"}, "fidelity": fidelity,
                "memorisation": memo, "arms": arms}

    # ---- synthetic cases
    def _synthetic(self, fold: Fold, model: Any, get_engine: Callable[[], Any], tag: str) -> dict[str, Any]:
        from .data import make_synthetic_labelmaps
        from .segmenter import make_seg_case

        cfg = self.config.synthetic
        identity = self.synthetic_identity(fold, model.sha256)
        key = stage_key(*identity)
        record = self._use("synthetic", key, cache_record(*identity, options=self.gan_options(fold)))
        folder = self.work / "synthetic" / key
        index_path = folder / "index.json"
        t0 = time.perf_counter()
        index = _read_json(index_path)
        computed = index is None
        if computed and self.d.main:
            train_cases = [(c, self.labelmaps[c]) for c in fold.train]
            specs = make_synthetic_labelmaps(train_cases, self.fold_extras(fold), self.template,
                                             (self.template_info or {}).get("name", "template"), cfg,
                                             self.config.seed * 1000 + fold.index)
            engine = get_engine()
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=folder.parent if folder.parent.exists()
                                        else _mkdir(folder.parent)))
            entries = []
            from tqdm import tqdm

            for spec in tqdm(specs, desc=f"{tag} synthesise", file=sys.stderr, disable=not self.progress or None,
                             leave=False):
                result = engine.synthesize(spec.labelmap, seed=spec.seed)
                labels = spec.labelmap.array
                case = make_seg_case(f"synthetic_{spec.index:04d}", result.normalized, labels,
                                     spec.labelmap.grid.spacing)
                np.save(tmp / f"{case.name}_images.npy", case.images.astype(np.float16))
                np.save(tmp / f"{case.name}_labels.npy", labels)
                entries.append(dict(spec.provenance(), name=case.name,
                                    tumour_voxels=int(np.count_nonzero(tumour_mask(labels))),
                                    model_sha256=model.sha256))
            same, differing = self._older_synthetic(fold, model, key, tmp, entries)
            index = {"key": key, "cases": entries, "seconds": round(time.perf_counter() - t0, 2),
                     "same_data_as": same, "cache": dict(record, written=time.time())}
            write_json(index, tmp / "index.json")
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
            if same or differing:
                older = f"synthetic/{(same or differing)[0]}"
                _log(f"{tag}: synthetic cases made again (those cached in {older} were made by another version of "
                     "MedSynth or another synthetic config); " + (
                         "identical to them, so the arms trained on them are reused" if same else
                         "they differ, so the arms that train on them are trained again"))
        self.d.sync(self.device.type)
        index = _read_json(index_path)
        if not any(e["tumour_voxels"] for e in index["cases"]):
            raise MedSynthError(f"fold {fold.index}: the synthetic cases hold no tumour voxel, so the synthetic "
                                "arms would have no tumour to learn")
        cases = [self._load_synthetic(folder, e["name"], self.grid.spacing) for e in index["cases"]]
        self._stage_done(f"{tag} synthetic cases ({len(cases)})", "synth",
                         index["seconds"] if not computed else time.perf_counter() - t0, computed)
        return {"key": key, "folder": str(folder), "count": len(cases), "cases": cases,
                "provenance": index["cases"], "seconds": index["seconds"], "same_as": index.get("same_data_as", [])}

    def _older_synthetic(self, fold: Fold, model: Any, key: str, made: Path,
                         entries: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
        """The keys of this fold's synthetic cases cached under another key (another version of the code that
        keys them, or another config), split into those identical to the byte to the cases just made in ``made``
        and those that differ.

        An older version's cases are found by content, as :mod:`MedSynthLib.study.preview` finds them: made by
        this GAN in this fold's training brains.  Their edit records may be older (before ``random_tumour`` draw
        records), but an arm reads only the arrays, so an arm trained on identical arrays is valid for these.
        """
        import filecmp

        same: list[str] = []
        differing: list[str] = []
        names = [e["name"] for e in entries]
        for index_path in sorted((self.work / "synthetic").glob("*/index.json")):
            older = _read_json(index_path)
            if index_path.parent.name == key or not isinstance(older, dict) or not older.get("cases"):
                continue
            if (older.get("cache") or {}).get("inputs", {}).get("fold", fold.index) != fold.index:
                continue
            cases = older["cases"]
            bases = {e.get("base") for e in cases} & set(self.sha)
            if ({e.get("model_sha256") for e in cases} != {model.sha256} or not bases
                    or not bases <= set(fold.train)):
                continue
            try:
                identical = [e.get("name") for e in cases] == names and all(
                    filecmp.cmp(made / f"{name}_{part}.npy", index_path.parent / f"{name}_{part}.npy", shallow=False)
                    for name in names for part in ("images", "labels"))
            except OSError:  # an older folder missing an array
                identical = False
            (same if identical else differing).append(index_path.parent.name)
        return same, differing

    def _load_synthetic(self, folder: Path, name: str, spacing: float) -> SegCase:
        return self._load_arrays(folder / f"{name}_images.npy", folder / f"{name}_labels.npy", name, (spacing,) * 3)

    # ---- fidelity of the GAN on the held-out cases
    def _fidelity(self, fold: Fold, model: Any, get_engine: Callable[[], Any], tag: str) -> dict[str, Any]:
        from ..cases.readers import MODALITIES
        from ..evaluation.metrics import fidelity
        from ..schema.grid import LabelMap
        from ..schema.labels import NUM_CLASSES, brain_mask

        identity = self.fidelity_identity(fold, model.sha256)
        key = stage_key(*identity)
        record = self._use("fidelity", key, cache_record(*identity, options=self.gan_options(fold)))
        path = self.work / "fidelity" / f"{key}.json"
        t0 = time.perf_counter()
        result = _read_json(path)
        computed = result is None
        if computed and self.d.main:
            # Class means of the training cases (z-scored in the brain): the paint-by-numbers baseline.
            sums = np.zeros((4, NUM_CLASSES))
            counts = np.zeros(NUM_CLASSES)
            for c in fold.train:
                seg = self.seg_real[c]
                brain = brain_mask(seg.labels)
                counts += np.bincount(seg.labels[brain], minlength=NUM_CLASSES)
                for m in range(4):
                    sums[m] += np.bincount(seg.labels[brain], weights=seg.images[m][brain], minlength=NUM_CLASSES)
            means = sums / np.maximum(counts, 1)
            engine = get_engine()
            # Privacy (a): the same measure on as many training cases (seen by this GAN); a GAN that
            # memorised its training cases scores clearly better on them than on the held-out ones.
            seen = sorted(fold.train)[:len(fold.test)]
            from tqdm import tqdm

            with tqdm(total=len(fold.test) + len(seen), desc=f"{tag} fidelity", unit="case", file=sys.stderr,
                      disable=not self.progress or None, leave=False) as bar:
                cases = {}
                for c in fold.test:
                    real = self.real_case(c)
                    labels = real.labelmap.array
                    synthetic = engine.synthesize(LabelMap(labels, real.labelmap.grid), seed=0)
                    brain = real.brain
                    regions = {"tumour": tumour_mask(labels)}
                    entry: dict[str, Any] = {"model": {}, "class_mean_training": {}}
                    for m, modality in enumerate(MODALITIES):
                        entry["model"][modality] = fidelity(real.images[m], synthetic.images[modality], brain, regions)
                        painted = np.zeros(labels.shape, np.float32)
                        for value in range(1, NUM_CLASSES):
                            painted[labels == value] = means[m][value]
                        entry["class_mean_training"][modality] = fidelity(real.images[m], painted, brain, regions)
                    cases[c] = entry
                    np.save(_mkdir(self.work / "fidelity") / f"{key}_{c}_synthetic.npy",
                            np.stack([synthetic.images[m] for m in MODALITIES]).astype(np.float32))
                    bar.update()
                train_cases = {}
                for c in seen:
                    real = self.real_case(c)
                    synthetic = engine.synthesize(LabelMap(real.labelmap.array, real.labelmap.grid), seed=0)
                    train_cases[c] = {modality: fidelity(real.images[m], synthetic.images[modality], real.brain, {})
                                      for m, modality in enumerate(MODALITIES)}
                    bar.update()
            result = {"key": key, "cases": cases, "train_cases": train_cases,
                      "seconds": round(time.perf_counter() - t0, 2), "cache": dict(record, written=time.time())}
            _write_json_atomic(result, path)
        self.d.sync(self.device.type)
        result = _read_json(path)
        result["synthetic_images"] = {c: str(self.work / "fidelity" / f"{key}_{c}_synthetic.npy") for c in fold.test}
        self._stage_done(f"{tag} fidelity", "fidelity", result["seconds"] if not computed else
                         time.perf_counter() - t0, computed)
        return result

    # ---- memorisation
    def _memorisation(self, fold: Fold, synth: dict[str, Any], tag: str) -> dict[str, Any]:
        from .report import ncc

        identity = self.memorisation_identity(fold, synth["key"])
        key = stage_key(*identity)
        record = self._use("memorisation", key, cache_record(*identity))
        path = self.work / "memorisation" / f"{key}.json"
        t0 = time.perf_counter()
        result = _read_json(path)
        computed = result is None
        if computed and self.d.main:
            entries = []
            for case, prov in zip(synth["cases"], synth["provenance"]):
                scores = {c: ncc(case, self.seg_real[c]) for c in fold.train}
                nearest = max(scores, key=scores.get)  # type: ignore[arg-type]
                entries.append({"name": prov["name"], "kind": prov["kind"], "base": prov["base"],
                                "nearest_training_case": nearest, "ncc_nearest": scores[nearest],
                                "ncc_base": scores.get(prov["base"]), "ncc_all": scores})
            result = {"key": key, "cases": entries, "seconds": round(time.perf_counter() - t0, 2),
                      "cache": dict(record, written=time.time())}
            _write_json_atomic(result, path)
        self.d.sync(self.device.type)
        result = _read_json(path)
        self._stage_done(f"{tag} memorisation check", "memo", result["seconds"] if not computed else
                         time.perf_counter() - t0, computed)
        return result

    # ---- segmentation arms
    GAN_MODULES = ("MedSynthLib.training.train", "MedSynthLib.training.data", "MedSynthLib.synthesis.networks")
    SYNTHETIC_MODULES = ("MedSynthLib.study.data", "MedSynthLib.edits.base", "MedSynthLib.edits.transforms", "MedSynthLib.edits.insert",
                         "MedSynthLib.edits.parametric", "MedSynthLib.edits.random_edits", "MedSynthLib.synthesis.synthesize")
    SEGMENTER_MODULES = ("MedSynthLib.study.segmenter", "MedSynthLib.study.stages", "MedSynthLib.study.nnunet_engine")
    BASELINE_MODULES = ("MedSynthLib.study.baseline", "MedSynthLib.study.segmenter")
    COPY_PASTE_MODULES = SEGMENTER_MODULES + ("MedSynthLib.study.copypaste", "MedSynthLib.edits.insert",
                                              "MedSynthLib.edits.base", "MedSynthLib.edits.transforms",
                                              "MedSynthLib.edits.geometry")

    # ---- what each stage's cache key hashes: (inputs, config, modules), also recorded in its result
    def _use(self, folder: str, key: str, record: dict[str, Any]) -> dict[str, Any]:
        self.used.setdefault(folder, {})[key] = record
        return record

    def gan_options(self, fold: Fold) -> dict[str, Any]:
        """The options that made the fold's GAN (its key holds only the weights' sha256): a run of other GAN
        options made its synthetic cases and fidelity with other options, not an older version of them."""
        if fold.index in self.inputs.gan_models:
            return {"gan_model": self.config.gan_model}
        return {"gan": self.config.train_config.to_json()}

    def synthetic_identity(self, fold: Fold, model_sha256: str) -> tuple[dict[str, Any], Any, tuple[str, ...]]:
        return ({"model": model_sha256, "train": [self.sha[c] for c in fold.train],
                 "extras": [e.sha256 for e in self.fold_extras(fold)], "template": self.template_info,
                 "grid": self.grid.to_json(), "seed": self.config.seed, "fold": fold.index, "v": STUDY_VERSION},
                self.config.synthetic, self.SYNTHETIC_MODULES)

    def fidelity_identity(self, fold: Fold, model_sha256: str) -> tuple[dict[str, Any], Any, tuple[str, ...]]:
        return ({"model": model_sha256, "test": [self.sha[c] for c in fold.test],
                 "train": [self.sha[c] for c in fold.train], "v": STUDY_VERSION}, {"train_gap": 1},
                ("MedSynthLib.evaluation.metrics", "MedSynthLib.synthesis.synthesize"))

    def memorisation_identity(self, fold: Fold, synthetic_key: str) -> tuple[dict[str, Any], Any, tuple[str, ...]]:
        return ({"synthetic": synthetic_key, "train": [self.sha[c] for c in fold.train], "v": STUDY_VERSION}, {},
                ("MedSynthLib.study.report",))

    def baseline_identity(self, fold: Fold) -> tuple[dict[str, Any], Any, tuple[str, ...]]:
        from . import baseline

        return ({"train": [self.sha[c] for c in fold.train], "test": [self.sha[c] for c in fold.test],
                 "grid": self.grid.to_json()}, {"variants": baseline.VARIANTS}, self.BASELINE_MODULES)

    def arm_identity(self, fold: Fold, arm: str, seed: int, synthetic_key: str | None
                     ) -> tuple[dict[str, Any], Any, tuple[str, ...]]:
        cfg = self.config.seg_config
        copy_paste = arm == "real+copypaste"
        return ({"arm": arm, "train": [self.sha[c] for c in self._arm_real_cases(fold, arm)],
                 "test": [self.sha[c] for c in fold.test],
                 "finetune": self._finetune_cases(fold) if arm == "synthetic+finetune" else [],
                 "synthetic": synthetic_key if arm in SYNTHETIC_ARMS else None, "seed": seed, "fold": fold.index,
                 "world": self.d.world, "v": STUDY_VERSION,
                 **({"grid": self.grid.to_json(), "study_seed": self.config.seed} if copy_paste else {})},
                {k_: v for k_, v in cfg.to_json().items() if k_ != "seeds"},
                self.COPY_PASTE_MODULES if copy_paste else self.SEGMENTER_MODULES)

    def _finetune_cases(self, fold: Fold) -> list[str]:
        cfg = self.config.seg_config
        n = max(1, int(math.ceil(cfg.finetune_case_fraction * len(fold.train))))
        rng = np.random.default_rng([self.config.seed, fold.index, 7])
        return sorted(fold.train[i] for i in rng.choice(len(fold.train), n, replace=False))

    def _arm_real_cases(self, fold: Fold, arm: str) -> list[str]:
        """The arm's real training cases: all, or a seeded share of them (learning curve)."""
        from .segmenter import ARM_REAL_FRACTION

        fraction = ARM_REAL_FRACTION.get(arm)
        if fraction is None:
            return list(fold.train)
        n = max(1, int(math.ceil(fraction * len(fold.train))))
        rng = np.random.default_rng([self.config.seed, fold.index, 25])
        order = [fold.train[i] for i in rng.permutation(len(fold.train))]
        # The first tumour-bearing cases of one fixed order: the 25 % subset lies inside the 50 % one.
        with_tumour = [c for c in order if len(self.seg_real[c].tumour_voxels)]
        rest = [c for c in order if c not in with_tumour]
        return sorted((with_tumour + rest)[:n])

    def _painted(self, fold: Fold, synth: dict[str, Any]) -> list[SegCase]:
        """Control C1: the fold's edited label maps painted with the training cases' class means."""
        from ..schema.labels import NUM_CLASSES

        sums = np.zeros((4, NUM_CLASSES))
        counts = np.zeros(NUM_CLASSES)
        for c in fold.train:
            seg = self.seg_real[c]
            brain = seg.labels > 0
            counts += np.bincount(seg.labels[brain], minlength=NUM_CLASSES)
            for m in range(4):
                sums[m] += np.bincount(seg.labels[brain], weights=np.asarray(seg.images[m])[brain],
                                       minlength=NUM_CLASSES)
        means = (sums / np.maximum(counts, 1)).astype(np.float32)
        means[:, 0] = 0.0
        return [SegCase(f"painted_{case.name}", means[:, case.labels], case.labels, case.spacing)
                for case in synth["cases"]]

    def _copy_paste(self, fold: Fold) -> tuple[list[SegCase], list[dict[str, Any]]]:
        """Control C2: tumours of the fold's real training cases pasted into other training cases (cached per fold)."""
        from .copypaste import make_copy_paste_cases

        cache = self.__dict__.setdefault("_copy_paste_cache", {})
        if fold.index not in cache:
            train = [(self.seg_real[c], self.labelmaps[c]) for c in fold.train]
            cache[fold.index] = make_copy_paste_cases(train, self.config.seed * 1000 + fold.index)
        return cache[fold.index]

    def _baseline(self, fold: Fold, tag: str) -> dict[str, Any]:
        """The FLAIR-threshold gate, fitted on the fold's training cases only (both variants)."""
        from . import baseline
        from .segmenter import score
        from .stages import cached_stage

        identity = self.baseline_identity(fold)
        key = stage_key(*identity)
        record = self._use("baseline", key, cache_record(*identity))
        t0 = time.perf_counter()

        def compute() -> dict[str, Any]:
            out: dict[str, Any] = {"key": key, "variants": {}}
            for variant in baseline.VARIANTS:
                fitted = baseline.fit([self.seg_real[c] for c in fold.train], variant)
                scores = {c: score(fitted.predict(self.seg_real[c].images, self.seg_real[c].labels),
                                   self.seg_real[c].labels, self.seg_real[c].spacing) for c in fold.test}
                out["variants"][variant] = {"fit": fitted.to_json(), "scores": scores}
            out["seconds"] = round(time.perf_counter() - t0, 2)
            out["cache"] = dict(record, written=time.time())
            return out

        result, computed = cached_stage(self.work / "baseline" / f"{key}.json", compute, write=self.d.main)
        self._stage_done(f"{tag} FLAIR-threshold baseline", "baseline", result["seconds"] if not computed else
                         time.perf_counter() - t0, computed)
        return result

    def _arm(self, fold: Fold, arm: str, synth: dict[str, Any], tag: str) -> dict[str, Any]:
        """One learned arm, trained with every seed; scores per seed."""
        cfg = self.config.seg_config
        seeds = [self._arm_seed(fold, arm, k) for k in range(cfg.seeds)]
        runs = [self._arm_seed_run(fold, arm, synth, tag, k, seed) for k, seed in enumerate(seeds)]
        return {"arm": arm, "seeds": seeds, "runs": runs, "finetune_cases": runs[0]["finetune_cases"],
                "real_cases": runs[0]["real_cases"], "training": runs[0]["training"],
                "copy_paste_cases": runs[0].get("copy_paste_cases"),
                "seconds": round(sum(r["seconds"] for r in runs), 2)}

    def _arm_seed(self, fold: Fold, arm: str, k: int) -> int:
        return self.config.seed + 101 * fold.index + 1009 * k

    def _arm_seed_run(self, fold: Fold, arm: str, synth: dict[str, Any], tag: str, k: int,
                      seed: int) -> dict[str, Any]:
        from .segmenter import arm_phases, evaluate_cases, train_segmenter
        from .stages import stage_key

        cfg = self.config.seg_config
        tune = self._finetune_cases(fold) if arm == "synthetic+finetune" else []
        real_ids = self._arm_real_cases(fold, arm)
        uses_synthetic = arm in SYNTHETIC_ARMS
        copy_paste = arm == "real+copypaste"

        def key_for(synthetic: str) -> str:
            return stage_key(*self.arm_identity(fold, arm, seed, synthetic))

        key = key_for(synth["key"])
        record = self._use("arms", key, cache_record(*self.arm_identity(fold, arm, seed, synth["key"])))
        path = self.work / "arms" / f"{key}.json"
        t0 = time.perf_counter()
        result = _read_json(path)
        if result is None and uses_synthetic:
            # Trained on synthetic cases cached under another key and identical to these (_older_synthetic):
            # the same result, kept under this key too.
            for older in synth.get("same_as", []):
                found = _read_json(self.work / "arms" / f"{key_for(older)}.json")
                if isinstance(found, dict):
                    result = dict(found, key=key, reused_from=found.get("key"),
                                  cache=dict(record, written=time.time()))
                    if self.d.main:
                        _write_json_atomic(result, path)
                    break
        computed = result is None
        if computed:
            real = [self.seg_real[c] for c in real_ids]
            painted = self._painted(fold, synth) if arm == "real+classmean" else None
            pasted, paste_records = self._copy_paste(fold) if copy_paste else (None, None)
            phases = arm_phases(arm, real, synth["cases"], cfg, [self.seg_real[c] for c in tune], painted, pasted)
            for phase in phases:
                if not any(len(c.tumour_voxels) for c in phase.cases):
                    raise MedSynthError(f"fold {fold.index}, arm {arm}: the {phase.name} training cases hold no "
                                        "tumour voxel on the study grid, so the arm has no tumour to learn")
            _mkdir(path.parent)
            test_cases = [self.seg_real[c] for c in fold.test]
            if cfg.engine == "nnunetv2":
                from .nnunet_engine import predict_nnunet, train_nnunet
                from .segmenter import score

                nnunet_model, info = train_nnunet(phases, cfg, self.device, seed, path.with_suffix(".nnunet"),
                                                  progress=self.progress)
                masks = predict_nnunet(nnunet_model, test_cases, cfg, self.device, progress=self.progress)
                scores = {c.name: score(masks[c.name], c.labels, c.spacing) for c in test_cases}
            else:
                model, info = train_segmenter(phases, cfg, self.device, seed, desc=f"{tag} {arm} seed {k + 1}",
                                              checkpoint=path.with_suffix(".ckpt"), rank=self.d.rank,
                                              world=self.d.world, progress=self.progress)
            if self.d.main:
                if cfg.engine != "nnunetv2":
                    scores = evaluate_cases(model, test_cases, cfg, self.device)
                result = {"key": key, "arm": arm, "seed": seed, "scores": scores, "training": info,
                          "finetune_cases": tune, "real_cases": real_ids,
                          "seconds": round(time.perf_counter() - t0, 2),
                          "cache": dict(record, written=time.time())}
                if copy_paste:
                    result["copy_paste_cases"] = paste_records
                _write_json_atomic(result, path)
                shutil.rmtree(path.with_suffix(".ckpt"), ignore_errors=True)
                shutil.rmtree(path.with_suffix(".nnunet"), ignore_errors=True)
        self.d.sync(self.device.type)
        result = _read_json(path)
        self._stage_done(f"{tag} arm {arm} seed {k + 1}", "arm", result["seconds"] if not computed else
                         time.perf_counter() - t0, computed)
        return result


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
