"""nnU-Net v2 as the segmenter of ``medsynth study`` (``"engine": "nnunetv2"``, the ``paper`` config).

nnU-Net (Isensee et al., Nature Methods 2021) configures its own preprocessing, network and
training from the data, which makes it the field's reference segmenter for a study on a GPU.
Each arm and seed becomes one private nnU-Net dataset holding every training case of its phases;
nnU-Net fingerprints, plans and preprocesses it once (``3d_fullres``), then trains one phase per
fold of its ``splits_final.json`` (phase *k* trains on exactly the phase's cases), a later phase
starting from the weights of the one before (the fine-tuning of arm 4).  The BraTS regions are
trained as nnU-Net's region-based targets (whole tumour, tumour core, enhancing tumour).

How an arm's step budget maps onto nnU-Net: ``steps`` iterations of nnU-Net's own batch, split into
epochs of ``iterations_per_epoch``.  nnU-Net draws each batch's cases uniformly, so a phase that adds
cases on top of the real ones (real + synthetic, the controls) trains for
``steps * (real + added) / real`` iterations: each real case is drawn as often, in expectation, as
in the real-only arm, which is what the SegResNet engine gets by adding a second batch per step.

nnU-Net runs in a child process (``python -m MedSynthLib.study.nnunet_engine``) with its three
folder variables pointing into the arm's work folder, so it never touches a user's own nnU-Net
folders and its worker processes end with it.  No weights are pickled: nnU-Net's own
checkpointing is switched off and the trained weights are kept as safetensors + JSON (with their
sha256, checked before prediction).  (nnU-Net's preprocessed cases carry their properties as .pkl
files, its internal format, inside the arm's folder, which the study deletes once the arm is scored.)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..generate.layouts import NNUNET_CHANNEL_NAMES, NNUNET_REGION_LABELS, NNUNET_REGIONS_CLASS_ORDER
from ..schema.errors import MedSynthError
from ..schema.labels import schema_to_tumour
from ..schema.provenance import file_sha256 as _sha256
from ..schema.volume_io import write_json

if TYPE_CHECKING:
    from .segmenter import Phase, SegCase, SegConfig

#: The private dataset id inside an arm's own nnU-Net folders.
DATASET_ID = 990
DATASET_NAME = f"Dataset{DATASET_ID}_MedSynthStudyArm"
WEIGHTS_VERSION = 1


@dataclass
class NNUnetModel:
    """A trained arm: its nnU-Net work folder and the safetensors weights in ``folder / "model"``."""

    folder: Path
    configuration: str


def phase_iterations(phase: "Phase") -> int:
    """nnU-Net iterations of a phase: its steps, scaled so each real case is drawn as often as without ``extra``."""
    steps = phase.stop - phase.start
    if not phase.extra:
        return steps
    return int(math.ceil(steps * (len(phase.cases) + len(phase.extra)) / len(phase.cases)))


def _folders(root: Path) -> dict[str, Path]:
    return {"nnUNet_raw": root / "raw", "nnUNet_preprocessed": root / "preprocessed", "nnUNet_results": root / "results"}


def _write_case(case: "SegCase", images_dir: Path, name: str, labels_dir: Path | None) -> None:
    import SimpleITK as sitk

    spacing_ijk = tuple(float(s) for s in case.spacing[::-1])
    images_dir.mkdir(parents=True, exist_ok=True)
    for c in range(case.images.shape[0]):
        image = sitk.GetImageFromArray(np.ascontiguousarray(case.images[c], dtype=np.float32))
        image.SetSpacing(spacing_ijk)
        sitk.WriteImage(image, str(images_dir / f"{name}_{c:04d}.nii.gz"), useCompression=True)
    if labels_dir is not None:
        labels_dir.mkdir(parents=True, exist_ok=True)
        seg = sitk.GetImageFromArray(schema_to_tumour(case.labels, "msd"))  # 1 ED, 2 NCR, 3 ET
        seg.SetSpacing(spacing_ijk)
        sitk.WriteImage(seg, str(labels_dir / f"{name}.nii.gz"), useCompression=True)


def write_training_dataset(phases: "Sequence[Phase]", root: Path) -> list[dict[str, list[str]]]:
    """Write every training case of the phases as one nnU-Net raw dataset; returns one split per phase.

    Cases are named ``case0000``... in order of first appearance (a case in several phases is written
    once); each split trains on its phase's cases and validates (nnU-Net's per-epoch pseudo Dice,
    never used for any choice) on up to two of them: the held-out cases are never written here.
    """
    raw = _folders(root)["nnUNet_raw"] / DATASET_NAME
    names: dict[int, str] = {}
    splits: list[dict[str, list[str]]] = []
    for phase in phases:
        train: list[str] = []
        for case in list(phase.cases) + list(phase.extra):
            if id(case) not in names:
                names[id(case)] = f"case{len(names):04d}"
                _write_case(case, raw / "imagesTr", names[id(case)], raw / "labelsTr")
            train.append(names[id(case)])
        splits.append({"train": train, "val": train[:2]})
    write_json({"channel_names": NNUNET_CHANNEL_NAMES, "labels": NNUNET_REGION_LABELS,
                "regions_class_order": NNUNET_REGIONS_CLASS_ORDER, "numTraining": len(names), "file_ending": ".nii.gz",
                "description": "one arm of a medsynth study (z-scored in the brain, study grid)"},
               raw / "dataset.json", overwrite=True)
    return splits


def _run_child(action: str, spec: dict[str, Any], root: Path, progress: bool) -> None:
    spec_path = root / f"{action}_spec.json"
    write_json(spec, spec_path, overwrite=True)
    log_path = root / f"{action}.log"
    env = dict(os.environ, **{k: str(v) for k, v in _folders(root).items()}, nnUNet_compile="f")
    if progress:
        print(f"nnU-Net {action}: log in {log_path}", file=sys.stderr)
    with open(log_path, "w") as log:
        result = subprocess.run([sys.executable, "-m", "MedSynthLib.study.nnunet_engine", action, str(spec_path)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        tail = log_path.read_text().strip().splitlines()[-1:] if log_path.exists() else []
        raise MedSynthError(f"{log_path}: nnU-Net {action} failed (exit {result.returncode})"
                            + (f": {tail[0][:300]}" if tail else ""))


def train_nnunet(phases: "Sequence[Phase]", config: "SegConfig", device: Any, seed: int, root: Path, *,
                 progress: bool = False) -> tuple[NNUnetModel, dict[str, Any]]:
    """Train one arm with nnU-Net in ``root`` (created afresh); returns the model and its training record."""
    import time

    started = time.perf_counter()
    if root.exists():
        shutil.rmtree(root)  # nnU-Net runs are not resumed: an interrupted arm starts again
    root.mkdir(parents=True)
    splits = write_training_dataset(phases, root)
    plan = []
    for k, (phase, split) in enumerate(zip(phases, splits)):
        iterations = phase_iterations(phase)
        epochs = max(1, math.ceil(iterations / config.iterations_per_epoch))
        plan.append({"fold": k, "name": phase.name, "epochs": epochs,
                     "iterations_per_epoch": math.ceil(iterations / epochs), "train_cases": len(split["train"])})
    spec = {"configuration": config.nnunet_configuration, "device": str(device), "seed": int(seed),
            "splits": splits, "phases": plan, "val_iterations": config.nnunet_val_iterations,
            "n_proc_da": config.nnunet_processes, "processes": max(1, config.nnunet_processes or 1),
            "initial_lr": config.lr}
    _run_child("train", spec, root, progress)
    info = {"engine": "nnunetv2", "configuration": config.nnunet_configuration,
            "seconds": round(time.perf_counter() - started, 1), "steps": int(sum(p["epochs"] * p["iterations_per_epoch"]
                                                                                 for p in plan)),
            "phases": plan, "resumed_from_step": 0}
    return NNUnetModel(root, config.nnunet_configuration), info


def predict_nnunet(model: NNUnetModel, cases: "Sequence[SegCase]", config: "SegConfig", device: Any, *,
                   progress: bool = False) -> dict[str, np.ndarray]:
    """(3, k, j, i) boolean WT / TC / ET masks of each case, predicted by nnU-Net (with its mirroring)."""
    import SimpleITK as sitk

    from .segmenter import keep_largest_component

    test_dir, out_dir = model.folder / "imagesTs", model.folder / "predictions"
    shutil.rmtree(test_dir, ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    names = {case.name: f"test{i:04d}" for i, case in enumerate(cases)}
    for case in cases:
        _write_case(case, test_dir, names[case.name], None)
    _run_child("predict", {"configuration": model.configuration, "device": str(device), "images": str(test_dir),
                           "output": str(out_dir), "overlap": 1.0 - config.sw_overlap}, model.folder, progress)
    masks: dict[str, np.ndarray] = {}
    for case in cases:
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out_dir / f"{names[case.name]}.nii.gz")))
        if seg.shape != case.labels.shape:
            raise MedSynthError(f"{out_dir}: nnU-Net returned {seg.shape} for a case of {case.labels.shape}")
        # nnU-Net's labels 1 oedema, 2 core, 3 enhancing (the regions nest): WT > 0, TC in {2, 3}, ET 3.
        stack = np.stack([seg > 0, (seg == 2) | (seg == 3), seg == 3])
        masks[case.name] = keep_largest_component(stack) if config.largest_component else stack
    return masks


# --- the child process (nnU-Net's folder variables are set before nnunetv2 is imported) ---------------


def _state_sha256(state: dict[str, Any]) -> str:
    """sha256 of a network's weights (names and values), to record which weights a phase started from."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _child_train(spec: dict[str, Any]) -> None:  # pragma: no cover - runs in the child process
    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                      preprocess)
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from safetensors.torch import save_file

    class StudyTrainer(nnUNetTrainer):
        """nnU-Net's default trainer with the arm's schedule and nnU-Net's pickled checkpoints switched off."""

        # nnU-Net records its constructor's arguments by name, so the signature is spelled out.
        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")) -> None:
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.disable_checkpointing = True

    configuration = spec["configuration"]
    processes = int(spec["processes"])
    extract_fingerprints([DATASET_ID], num_processes=processes, check_dataset_integrity=True, verbose=False)
    plan_experiments([DATASET_ID])
    preprocess([DATASET_ID], configurations=[configuration], num_processes=[processes], verbose=False)
    if spec.get("n_proc_da") is not None:
        # Set only now: nnU-Net's planner also sizes its torch threads by this variable and refuses 0.
        os.environ["nnUNet_n_proc_DA"] = str(spec["n_proc_da"])
    base = Path(str(nnUNet_preprocessed)) / DATASET_NAME
    (base / "splits_final.json").write_text(json.dumps(spec["splits"], indent=1))
    plans = json.loads((base / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((Path(str(nnUNet_raw)) / DATASET_NAME / "dataset.json").read_text())
    device = torch.device(spec["device"])
    previous: dict[str, Any] | None = None
    trainer = None
    record: list[dict[str, Any]] = []
    for phase in spec["phases"]:
        _seed_everything(int(spec["seed"]) + 7919 * int(phase["fold"]))
        trainer = StudyTrainer(dict(plans, continue_training=False), configuration, int(phase["fold"]), dataset_json,
                               device)
        trainer.num_epochs = int(phase["epochs"])
        trainer.num_iterations_per_epoch = int(phase["iterations_per_epoch"])
        trainer.num_val_iterations_per_epoch = int(spec["val_iterations"])
        trainer.initial_lr = float(spec["initial_lr"])
        trainer.initialize()
        if previous is not None:  # fine-tuning: start from the previous phase's weights
            trainer.network.load_state_dict(previous)
        start_sha = _state_sha256(trainer.network.state_dict())
        trainer.run_training()
        previous = {k: v.detach().clone() for k, v in trainer.network.state_dict().items()}
        record.append({"fold": int(phase["fold"]), "weights_at_start_sha256": start_sha,
                       "weights_at_end_sha256": _state_sha256(previous)})
    assert trainer is not None and previous is not None
    model_dir = Path(os.environ["nnUNet_results"]).parent / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in previous.items()}
    save_file(state, str(model_dir / "weights.safetensors"))
    (model_dir / "plans.json").write_text(json.dumps(plans, indent=1))
    (model_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    axes = trainer.inference_allowed_mirroring_axes
    (model_dir / "model.json").write_text(json.dumps({
        "version": WEIGHTS_VERSION, "engine": "nnunetv2", "configuration": configuration,
        "weights_sha256": _sha256(model_dir / "weights.safetensors"), "phases": record,
        "inference_allowed_mirroring_axes": list(axes) if axes is not None else None}, indent=1))


def _child_predict(spec: dict[str, Any]) -> None:  # pragma: no cover - runs in the child process
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from safetensors.torch import load_file

    model_dir = Path(os.environ["nnUNet_results"]).parent / "model"
    meta = json.loads((model_dir / "model.json").read_text())
    if meta.get("version") != WEIGHTS_VERSION or meta.get("engine") != "nnunetv2":
        raise MedSynthError(f"{model_dir / 'model.json'}: not nnU-Net weights of version {WEIGHTS_VERSION}")
    if _sha256(model_dir / "weights.safetensors") != meta["weights_sha256"]:
        raise MedSynthError(f"{model_dir / 'weights.safetensors'}: sha256 does not match model.json")
    plans = PlansManager(json.loads((model_dir / "plans.json").read_text()))
    dataset_json = json.loads((model_dir / "dataset.json").read_text())
    cm = plans.get_configuration(meta["configuration"])
    network = nnUNetTrainer.build_network_architecture(
        plans, cm, determine_num_input_channels(plans, cm, dataset_json),
        plans.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False)
    state = load_file(str(model_dir / "weights.safetensors"))
    device = torch.device(spec["device"])
    predictor = nnUNetPredictor(tile_step_size=float(spec["overlap"]), use_gaussian=True, use_mirroring=True,
                                device=device, verbose=False, allow_tqdm=False)
    axes = meta["inference_allowed_mirroring_axes"]
    predictor.manual_initialization(network, plans, cm, [state], dataset_json, "nnUNetTrainer",
                                    tuple(axes) if axes is not None else None)
    Path(spec["output"]).mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files_sequential(spec["images"], spec["output"], save_probabilities=False, overwrite=True)


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - the child process's entry point
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] not in ("train", "predict"):
        print("usage: python -m MedSynthLib.study.nnunet_engine {train,predict} SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[1]).read_text())
    try:
        (_child_train if args[0] == "train" else _child_predict)(spec)
    except MedSynthError as exc:
        print(f"medsynth: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
