"""The tumour segmenter of ``medsynth study``: MONAI SegResNet on the BraTS regions.

Three sigmoid outputs (WT, TC, ET, overlapping as in the BraTS challenge),
Dice + cross-entropy loss, patches biased towards the tumour with flips,
intensity jitter and an optional per-contrast blur (older, thick-slice scans),
polynomial learning-rate decay, sliding-window inference.
Inputs are z-scored per modality inside the brain.  Every patch is drawn from a
generator seeded by (seed, step, rank), so a resumed arm sees the patches an
uninterrupted one would have seen; checkpoints are safetensors + JSON.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..schema.errors import InputError
from ..schema.labels import Label, brain_mask, core_mask, tumour_mask
from ..synthesis.normalize import zscore

REGIONS: tuple[str, ...] = ("WT", "TC", "ET")
ENGINES: tuple[str, ...] = ("segresnet", "nnunetv2")


@dataclass
class SegConfig:
    init_filters: int = 8
    blocks_down: tuple[int, ...] = (1, 2, 2, 4)
    blocks_up: tuple[int, ...] = (1, 1, 1)
    dropout: float = 0.0
    patch_size: int = 48
    batch_size: int = 2
    steps: int = 200
    lr: float = 1e-3
    weight_decay: float = 1e-5
    poly_power: float = 0.9
    tumour_fraction: float = 0.7
    flip: bool = True
    intensity: float = 0.1
    # Largest Gaussian sigma (voxels) of a per-contrast blur applied to half the patches' contrasts
    # (0: off; its draws come from a stream of their own, so the patches are the same either way).
    # Scans upsampled from thick slices (the 2013 BraTS cases) are far smoother than the others.
    blur: float = 0.0
    finetune_case_fraction: float = 0.1  # arm 4 (Shin et al.: 10 %): fraction of the real training cases it is fine-tuned on
    finetune_step_fraction: float = 0.3  # arm 4: share of the step budget spent fine-tuning
    threshold: float = 0.5
    largest_component: bool = False  # keep the largest whole-tumour component (TC and ET inside it): drops stray voxels
    sw_overlap: float = 0.25
    sw_batch_size: int = 2
    precision: str = "fp32"
    checkpoint_every: int = 0  # 0: no mid-arm checkpoints (short arms)
    seeds: int = 3  # every learned arm is trained with this many seeds; the spread is reported
    # "segresnet": MONAI SegResNet trained here (the CPU configs); "nnunetv2": nnU-Net v2 plans, trains and
    # predicts each arm in a child process (the paper config, for a GPU; MedSynthLib/study/nnunet_engine.py).
    # For nnU-Net, steps count nnU-Net iterations (its own batch and patch), lr is its initial learning rate,
    # and the network fields above do not apply.
    engine: str = "segresnet"
    iterations_per_epoch: int = 250
    nnunet_configuration: str = "3d_fullres"
    nnunet_val_iterations: int = 50
    nnunet_processes: int | None = None  # data-augmentation workers (nnUNet_n_proc_DA); None: nnU-Net's default

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str) -> "SegConfig":
        from ..schema.jsonshape import check_fields

        check_fields(cls, data, source, "segmenter")
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        config = cls(**data)
        multiple = 2 ** (len(config.blocks_down) - 1)
        if config.patch_size % multiple:
            raise InputError(source, f"segmenter patch_size {config.patch_size} is not a multiple of {multiple}")
        if config.blur < 0:
            raise InputError(source, f"segmenter blur {config.blur} must be 0 (off) or a positive sigma in voxels")
        if config.steps < 1 or config.batch_size < 1:
            raise InputError(source, "segmenter steps and batch_size must be at least 1")
        if not 0 < config.finetune_case_fraction <= 1 or not 0 < config.finetune_step_fraction < 1:
            raise InputError(source, "finetune_case_fraction must lie in (0, 1] and finetune_step_fraction in (0, 1)")
        if config.seeds < 1:
            raise InputError(source, "segmenter seeds must be at least 1")
        if config.engine not in ENGINES:
            raise InputError(source, f"segmenter engine {config.engine!r}: one of {', '.join(ENGINES)}")
        if config.iterations_per_epoch < 1 or config.nnunet_val_iterations < 1:
            raise InputError(source, "segmenter iterations_per_epoch and nnunet_val_iterations must be at least 1")
        if config.nnunet_processes is not None and config.nnunet_processes < 0:
            raise InputError(source, "segmenter nnunet_processes must be 0 or more (or null)")
        if config.precision not in ("fp32", "bf16", "fp16"):
            raise InputError(source, f"segmenter precision {config.precision!r}: fp32, bf16 or fp16")
        return config


@dataclass
class SegCase:
    """A case ready for the segmenter: z-scored images and region targets."""

    name: str
    images: np.ndarray  # (4, k, j, i) float32, z-scored in the brain, 0 outside
    labels: np.ndarray  # (k, j, i) uint8 schema labels
    spacing: tuple[float, float, float]  # array order (k, j, i), mm
    tumour_voxels: np.ndarray = field(init=False)
    brain_voxels: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.tumour_voxels = np.argwhere(tumour_mask(self.labels)).astype(np.int32)
        self.brain_voxels = np.argwhere(brain_mask(self.labels)).astype(np.int32)[::5]


def make_seg_case(name: str, images: np.ndarray, labels: np.ndarray, spacing_ijk: Sequence[float]) -> SegCase:
    brain = brain_mask(labels)
    z = np.stack([zscore(images[c], brain) for c in range(images.shape[0])]).astype(np.float32)
    return SegCase(name, z, labels.astype(np.uint8), tuple(float(s) for s in spacing_ijk[::-1]))  # type: ignore[arg-type]


def region_targets(labels: np.ndarray) -> np.ndarray:
    """(..., k, j, i) schema labels -> (3, ...) float WT / TC / ET."""
    wt = tumour_mask(labels)
    tc = core_mask(labels)
    et = labels == Label.ET
    return np.stack([wt, tc, et]).astype(np.float32)


def build_model(config: SegConfig) -> torch.nn.Module:
    from monai.networks.nets import SegResNet

    groups = math.gcd(8, config.init_filters)  # GroupNorm of 8 groups, fewer for tiny networks
    return SegResNet(spatial_dims=3, init_filters=config.init_filters, in_channels=4, out_channels=len(REGIONS),
                     blocks_down=config.blocks_down, blocks_up=config.blocks_up, dropout_prob=config.dropout or None,
                     norm=("GROUP", {"num_groups": groups}))


def _crop(case: SegCase, centre: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    lo = centre - size // 2
    shape = np.array(case.labels.shape)
    src_lo, src_hi = np.clip(lo, 0, shape), np.clip(lo + size, 0, shape)
    dst_lo = src_lo - lo
    dst_hi = dst_lo + (src_hi - src_lo)
    img = np.zeros((4,) + (size,) * 3, np.float32)
    lab = np.zeros((size,) * 3, np.uint8)
    src = tuple(slice(a, b) for a, b in zip(src_lo, src_hi))
    dst = tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))
    img[(slice(None),) + dst] = case.images[(slice(None),) + src]
    lab[dst] = case.labels[src]
    return img, lab


def sample_batch(cases: list[SegCase], config: SegConfig, seed: int, step: int, rank: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng([seed, step, rank])
    # The blur draws from its own stream: with or without it, the same patches, flips and jitter.
    blur_rng = np.random.default_rng([seed, step, rank, 1]) if config.blur > 0 else None
    images, targets = [], []
    for _ in range(config.batch_size):
        case = cases[int(rng.integers(len(cases)))]
        use_tumour = len(case.tumour_voxels) and rng.random() < config.tumour_fraction
        pool = case.tumour_voxels if use_tumour else case.brain_voxels
        centre = pool[int(rng.integers(len(pool)))] + rng.integers(-4, 5, 3)
        img, lab = _crop(case, centre, config.patch_size)
        if config.flip:
            for axis in range(3):
                if rng.random() < 0.5:
                    img, lab = np.flip(img, axis + 1), np.flip(lab, axis)
        if blur_rng is not None:
            img = _random_blur(img, config.blur, blur_rng)
        if config.intensity > 0:
            gain = rng.uniform(1 - config.intensity, 1 + config.intensity, (4, 1, 1, 1))
            shift = rng.uniform(-config.intensity, config.intensity, (4, 1, 1, 1))
            img = np.where(lab[None] > 0, img * gain + shift, 0.0)
        images.append(np.ascontiguousarray(img, dtype=np.float32))
        targets.append(region_targets(np.ascontiguousarray(lab)))
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(targets))


def _random_blur(img: np.ndarray, max_sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Each contrast of ``img`` (c, k, j, i) blurred with probability 0.5 by a Gaussian of sigma U(0, max_sigma)."""
    from scipy import ndimage

    out = np.array(img, dtype=np.float32)
    for channel in range(out.shape[0]):
        if rng.random() < 0.5:
            out[channel] = ndimage.gaussian_filter(out[channel], float(rng.uniform(0.0, max_sigma)), mode="nearest")
    return out


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@dataclass
class Phase:
    """A stretch of steps [start, stop) drawn from one set of cases.

    ``extra`` cases add a second batch of the same size to every step, on top of the
    batch drawn from ``cases``: real + synthetic keeps the real patches per step of the
    real-only arm and adds the synthetic ones instead of diluting them.
    """

    name: str
    cases: list[SegCase]
    start: int
    stop: int
    extra: list[SegCase] = field(default_factory=list)


def _save_checkpoint(folder: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    from ..training.checkpoint import write_checkpoint

    write_checkpoint(folder, step, {"model": model}, {"optimizer": optimizer})


def _load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    from ..training.checkpoint import read_checkpoint

    return read_checkpoint(folder, {"model": model}, {"optimizer": optimizer}, what="the segmenter")["step"]


def train_segmenter(phases: list[Phase], config: SegConfig, device: torch.device, seed: int, *,
                    desc: str = "segmenter", checkpoint: Path | None = None, rank: int = 0, world: int = 1,
                    progress: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train one arm; phases switch the training cases at fixed steps (same total budget)."""
    from monai.losses import DiceCELoss
    from tqdm import tqdm

    torch.manual_seed(seed)
    model = build_model(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = DiceCELoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
    total = phases[-1].stop
    start = 0
    if checkpoint is not None and (checkpoint / "state.json").exists():
        start = _load_checkpoint(checkpoint, model, optimizer)
    for group in optimizer.param_groups:
        group["initial_lr"] = config.lr  # the base of the poly rule; a checkpoint's lr is already decayed
    # Polynomial decay in closed form (torch's PolynomialLR multiplies per-step factors, which drifts in the
    # last bits and would make a resumed run differ from an uninterrupted one).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1.0 - step / total) ** config.poly_power,
                                                  last_epoch=start - 1)
    net: torch.nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    bar = tqdm(total=total, initial=start, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True,
               disable=not progress or rank != 0 or None, leave=False)
    losses: list[float] = []
    started = time.perf_counter()
    model.train()
    try:
        for step in range(start, total):
            phase = next(p for p in phases if p.start <= step < p.stop)
            images, targets = sample_batch(phase.cases, config, seed, step, rank)
            if phase.extra:
                more_images, more_targets = sample_batch(phase.extra, config, seed + 7919, step, rank)
                images, targets = torch.cat([images, more_images]), torch.cat([targets, more_targets])
            images, targets = images.to(device), targets.to(device)
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, config.precision):
                logits = net(images)
            loss = loss_fn(logits.float(), targets)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            losses.append(float(loss.detach()))
            bar.set_postfix_str(f"{phase.name} loss {losses[-1]:.3f}")
            bar.update(1)
            done = step + 1
            if (checkpoint is not None and rank == 0 and config.checkpoint_every
                    and done % config.checkpoint_every == 0 and done < total):
                _save_checkpoint(checkpoint, done, model, optimizer)
    finally:
        bar.close()
    model.eval()
    tail = losses[-max(1, len(losses) // 10):] if losses else [float("nan")]
    info = {"steps": total, "resumed_from_step": start, "seconds": round(time.perf_counter() - started, 1),
            "final_loss": float(np.mean(tail)),
            "phases": [{"name": p.name, "steps": p.stop - p.start, "cases": len(p.cases), "extra_cases": len(p.extra)}
                       for p in phases]}
    return model, info


def predict(model: torch.nn.Module, case: SegCase, config: SegConfig, device: torch.device) -> np.ndarray:
    """(3, k, j, i) boolean WT / TC / ET masks by sliding-window inference."""
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.asarray(case.images, np.float32)[None]).to(device)
    with torch.inference_mode(), _autocast(device, config.precision):
        logits = sliding_window_inference(x, (config.patch_size,) * 3, config.sw_batch_size,
                                          lambda t: model(t).float(), overlap=config.sw_overlap, mode="gaussian")
    masks = (torch.sigmoid(logits.float())[0] > config.threshold).cpu().numpy()
    return keep_largest_component(masks) if config.largest_component else masks


def keep_largest_component(masks: np.ndarray) -> np.ndarray:
    """(3, k, j, i) WT / TC / ET masks reduced to the largest connected WT component (TC, ET inside it)."""
    from scipy import ndimage

    labelled, count = ndimage.label(masks[0])
    if count <= 1:
        return masks
    largest = labelled == (int(np.argmax(np.bincount(labelled.ravel())[1:])) + 1)
    return masks & largest[None]


def score(prediction: np.ndarray, labels: np.ndarray, spacing_kji: Sequence[float]) -> dict[str, dict[str, float | None]]:
    """Dice and HD95 (mm) per region, with MONAI's metrics.

    Conventions for empty masks (as in the BraTS challenge for Dice): both empty
    -> Dice 1 and HD95 0; exactly one empty -> Dice 0 and HD95 undefined
    (``None``; left out of HD95 means and counted).
    """
    from monai.metrics import DiceMetric, HausdorffDistanceMetric

    truth = region_targets(labels).astype(bool)
    pred_t = torch.from_numpy(prediction[None].astype(np.float32))
    true_t = torch.from_numpy(truth[None].astype(np.float32))
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=False)(pred_t, true_t)[0]
    out: dict[str, dict[str, float | None]] = {}
    for r, region in enumerate(REGIONS):
        p_any, t_any = bool(prediction[r].any()), bool(truth[r].any())
        entry: dict[str, float | None] = {"dice": float(dice[r]), "gt_voxels": int(truth[r].sum()),
                                          "pred_voxels": int(prediction[r].sum())}
        if not p_any and not t_any:
            entry["dice"], entry["hd95"] = 1.0, 0.0
        elif p_any != t_any:
            entry["dice"], entry["hd95"] = 0.0, None
        else:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(
                    pred_t[:, r:r + 1], true_t[:, r:r + 1], spacing=[float(v) for v in spacing_kji])
            value = float(hd.reshape(-1)[0])
            entry["hd95"] = value if math.isfinite(value) else None
        out[region] = entry
    return out


def evaluate_cases(model: torch.nn.Module, cases: list[SegCase], config: SegConfig,
                   device: torch.device) -> dict[str, Any]:
    return {case.name: score(predict(model, case, config, device), case.labels, case.spacing)
            for case in cases}


def arm_phases(arm: str, real: list[SegCase], synthetic: list[SegCase], config: SegConfig,
               finetune_cases: list[SegCase], painted: list[SegCase] | None = None,
               pasted: list[SegCase] | None = None) -> list[Phase]:
    """The training phases of an arm.  ``real`` is already the arm's subset for the learning curve.

    ``painted`` are control C1's class-mean painted edits, ``pasted`` control C2's copy-paste cases
    (:mod:`MedSynthLib.study.copypaste`); both are added on top of the real batch, as in arm 2.
    """
    steps = config.steps
    if arm == "real" or arm.startswith("real@"):
        return [Phase(arm, real, 0, steps)]
    if arm == "real+synthetic":
        return [Phase("real+synthetic", real, 0, steps, extra=synthetic)]
    if arm == "real+classmean":
        return [Phase("real+classmean", real, 0, steps, extra=list(painted or []))]
    if arm == "real+copypaste":
        return [Phase("real+copypaste", real, 0, steps, extra=list(pasted or []))]
    if arm == "synthetic":
        return [Phase("synthetic", synthetic, 0, steps)]
    if arm == "synthetic+finetune":
        tune = max(1, int(round(steps * config.finetune_step_fraction)))
        return [Phase("synthetic", synthetic, 0, steps - tune), Phase("finetune", finetune_cases, steps - tune, steps)]
    raise ValueError(arm)


#: The learned arms; ``real@25`` and ``real@50`` are the learning curve (share of the real training cases).
ARMS: tuple[str, ...] = ("real", "real+synthetic", "synthetic", "synthetic+finetune", "real+classmean",
                         "real+copypaste", "real@25", "real@50")
ARM_TITLES: dict[str, str] = {
    "real": "1. real only",
    "real+synthetic": "2. real + synthetic (same real patches)",
    "synthetic": "3. synthetic only",
    "synthetic+finetune": "4. synthetic, fine-tuned on real",
    "real+classmean": "C1. real + class-mean painted edits",
    "real+copypaste": "C2. real + copy-pasted real tumours",
    "real@25": "L25. real only, 25 % of cases",
    "real@50": "L50. real only, 50 % of cases",
}
#: Share of the real training cases each arm trains on.
ARM_REAL_FRACTION: dict[str, float] = {"real@25": 0.25, "real@50": 0.5}

__all__ = ["SegConfig", "SegCase", "make_seg_case", "train_segmenter", "predict", "score", "evaluate_cases",
           "arm_phases", "ARMS", "ARM_TITLES", "ARM_REAL_FRACTION", "REGIONS"]
