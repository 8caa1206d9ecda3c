"""Training the label-map -> MRI GAN (``medsynth train``).

pix2pix in 3D after Shin et al. 2018: generator loss = adversarial (LSGAN or
hinge) + lambda * L1 with lambda = 100, Adam(2e-4, betas (0.5, 0.999)); patches
biased towards the tumour, flips and small affine/intensity augmentation.
Mixed precision (bf16 where available, fp16 + loss scaling otherwise),
optional gradient checkpointing, DDP under ``torchrun`` (NCCL on GPUs, gloo on
CPUs).  Checkpoints are safetensors + JSON, written atomically; ``--resume``
continues exactly from the last one, because every patch is drawn from a
generator seeded by (seed, step, rank).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from torch import nn

from ..evaluation.metrics import DATA_RANGE
from ..schema.errors import InputError, MedSynthError
from ..schema.labels import NUM_CLASSES, brain_mask, tumour_mask
from ..schema.volume_io import write_json
from ..synthesis.networks import (MODALITY_ORDER, Generator, NetworkConfig, build_discriminator,
                                  enable_gradient_checkpointing, one_hot, state_dict_unwrapped)
from ..synthesis.normalize import ZSCORE_KINDS
from .divergence import DivergenceGuard, masked_l1
from .data import (CaseSource, PatchSampler, RegionSampler, TrainingVolume, cases_by_name, data_summary,
                   find_case_sources, load_prepared_volume, prepare_volume)
from .losses import class_level_loss, contrast_order_loss, contrast_pairs, masked_ssim_loss

if TYPE_CHECKING:
    from ..synthesis.appearance import AppearancePrior
    from ..synthesis.models import ModelCard


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``RUN_DIR/train_config.json``)."""

    network: NetworkConfig = field(default_factory=NetworkConfig)
    patch_size: int = 96
    batch_size: int = 1
    steps: int = 2000
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    lr_decay_fraction: float = 0.5  # pix2pix: constant, then linear decay to 0 over this last fraction
    # Largest gradient norm of each network per step (torch.nn.utils.clip_grad_norm_; 0: no clipping, the recipe
    # of every model before session 38). The 6,000-step start recipe run for 12,000 steps blew up within three
    # steps near step 6,700, still near its full learning rate, after one large generator gradient; clipping at
    # 100 held that step (docs/model_card.md, "Training longer"). With clipping on, each network's norm before
    # clipping is logged.
    grad_clip: float = 0.0
    lambda_l1: float = 100.0
    # Where the L1 term counts: "patch" (every voxel, background target included) or "brain" (the label
    # map's brain only; the background of the output is replaced by the real one before the discriminator
    # sees it, as synthesis blanks it anyway). Counting the background pulls the brain's outermost layer
    # towards the background value (docs/model_card.md, 'The brain's outermost voxel layer').
    l1_region: str = "patch"
    # With l1_region "brain": the L1 weight of the brain's outermost voxel layer relative to the rest of the brain
    # (1: the same; that layer is about 4 % of a patch's brain). Measured at 10 with the default resampling, which
    # makes that layer's targets dark: the layer came out darker still (docs/model_card.md).
    rim_weight: float = 1.0
    # Weight of a 1 - SSIM term beside the L1, counted where the L1 counts, on the scale of MedSynth's metrics
    # (training/losses.py; z-score normalisations only). 0: the L1 and adversarial terms alone, as every model
    # before session 29.
    lambda_ssim: float = 0.0
    # Count the SSIM term only at voxels whose whole window lies where the loss counts (no window across the
    # brain's border). Off: every counted voxel, the recipe measured first (docs/model_card.md).
    ssim_interior: bool = False
    # Where the SSIM term counts: "loss" (where the L1 counts) or "tumour" (the tumour's voxels there; a patch
    # without tumour adds no SSIM term). Counted over the brain, the term darkened the brain's outermost layer
    # (docs/model_card.md); the tumour, where it gained most, rarely reaches that layer.
    ssim_region: str = "loss"
    # The SSIM term with its contrast factor (the full SSIM). False: luminance x structure only, which does not
    # reward a smooth prediction for making up its missing texture's spread. Tried against the full term's
    # exaggerated grey/white contrast: the contrast stayed, fidelity fell a little (docs/model_card.md, session 34).
    ssim_contrast: bool = True
    # Added to the prediction and the real patch (network units) before the SSIM term compares them
    # (training/losses.masked_ssim_loss). 0: the network's own zero, the healthy tissue's mean for the z-score kinds,
    # as every model before session 35; 1 (the background at zero): the default model's recipe since session 35.
    ssim_offset: float = 0.0
    # Weight of a hinge below the darkest real signal: the mean, where the loss counts, of how far the output lies
    # below the floor the model will carry (the median over the training cases of each brain's darkest signal,
    # normalize.signal_floor_z). The SSIM term drew up to a fifth of the brain's outermost layer below it
    # (docs/model_card.md). 0: off, as every model before session 29. z-score normalisations only.
    lambda_floor: float = 0.0
    # The floor hinge also for wide appearance codes: each step renders the patch a second time with a code drawn
    # from a standard normal scaled by this (from (seed, step, rank)) and adds lambda_floor x its shortfall below
    # the floor. Codes past the training distribution darkened the brain's outermost layer (docs/model_card.md,
    # "Appearance spread"); 0: off, as every model before session 42. Needs lambda_floor and an appearance code.
    floor_code_spread: float = 0.0
    # The renderings with those wide codes also face the discriminator: it learns to tell them from real patches and
    # the generator to make them pass, as the random-code branch of BicycleGAN (Zhu et al., NeurIPS 2017) makes codes
    # drawn from the prior give realistic images. False: the floor hinge alone. Needs floor_code_spread and an
    # adversarial term.
    adversarial_wide_codes: bool = False
    # Weight of a hinge that keeps the contrast rules on the wide codes' renderings (training/losses.
    # contrast_order_loss): per patch and rule pair the real patch keeps, the rendering's class-mean difference must
    # be at least wide_contrast_keep of the real one. A wide code can keep the edge above the floor and still wash
    # the tissues out (docs/model_card.md, "Wide appearance codes"). 0: off, as every model before session 43.
    # Needs floor_code_spread.
    lambda_wide_contrast: float = 0.0
    wide_contrast_keep: float = 0.5
    # Weight of a term holding each label class's level (training/losses.class_level_loss: per patch and class, the
    # prediction's mean against the real one's, where the loss counts). 0: off, as every model before session 35;
    # tried at 100 and 300 against the exaggerated grey/white contrast, not used (docs/model_card.md, session 35).
    lambda_class_level: float = 0.0
    adversarial: str = "lsgan"  # lsgan | hinge | none (L1 only)
    # Weight of the appearance code's KL term (networks with network.style_dim > 0): pulls the codes encoded
    # from the real images towards a standard normal (synthesis draws from where they end up: appearance_patches).
    style_kl_weight: float = 0.5
    # Training patches encoded at export to fit the distribution a seed's appearance code is drawn from
    # (networks with an appearance code; MedSynthLib.synthesis.appearance). 0: none is fitted and synthesis
    # draws standard-normal codes, as every model before session 31.
    appearance_patches: int = 1000
    tumour_fraction: float = 0.5
    flip: bool = True
    rotate_deg: float = 10.0
    scale: float = 0.1
    # Random gain (about the background) and shift of each patch's contrasts, in network units: mild for the
    # percentile normalisation, up to 0.6-0.75 z each under the z-score kinds (12-15 tissue SDs to a unit); the default
    # model's recipe sets 0 since session 35 (docs/model_card.md).
    intensity: float = 0.05
    # Resample the images of a rotated or scaled patch from brain voxels only (the background stays -1). The
    # default false is the recipe of every model trained before session 26: the brain's outermost layer took up to
    # half its target from the background, which the network learnt as a dark rim (docs/model_card.md).
    brain_only_interpolation: bool = False
    normalization: str = "percentile"  # percentile | healthy_zscore | tissue_zscore (MedSynthLib.synthesis.normalize)
    val_cases: list[str] = field(default_factory=list)
    # Cross-validation by case: disjoint lists of case-folder names; with ``cv_fold = k`` (``--fold k``) fold k
    # is held out as the validation cases and the rest is trained on.  Keep every patient in one fold.
    cv_folds: list[list[str]] = field(default_factory=list)
    cv_fold: int | None = None
    val_every: int = 500
    checkpoint_every: int = 100
    log_every: int = 10
    # Steps over which the generator's L1 is compared with painting each patch with its own mean
    # (training/divergence.py); 0 turns the check off.
    divergence_window: int = 200
    precision: str = "auto"
    gradient_checkpointing: bool = False
    seed: int = 0
    threads: int | None = None
    init_from: str | None = None  # a model (name or folder) whose generator weights start the run
    # Inpainting networks (network.kind: inpainting): probability of a region grown around the patch's tumour
    # (else random ellipsoids in the brain), and the range of that growth in voxels.
    inpaint_tumour_fraction: float = 0.6
    inpaint_margin_range: tuple[float, float] = (3.0, 12.0)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["network"] = self.network.to_json()
        data["betas"] = list(self.betas)
        data["inpaint_margin_range"] = list(self.inpaint_margin_range)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        from ..schema.jsonshape import check_fields, expect_object
        from ..synthesis.models import check_network_config

        data = dict(check_fields(cls, expect_object(data, source, "a training config"), source, "training"))
        if "network" in data:
            # NetworkConfig.from_json ignores unknown keys (model configs from newer versions);
            # in a training config a misspelt architecture key must not be dropped silently.
            unknown = set(expect_object(data["network"], source, "network")) - set(NetworkConfig.__dataclass_fields__)
            if unknown:
                raise InputError(source, f"unknown network options {sorted(unknown)}")
            data["network"] = check_network_config(data["network"], source)
        for name in ("betas", "inpaint_margin_range"):
            if name in data:
                data[name] = tuple(data[name])
        config = cls(**data)
        _check_values(config, source)
        if config.adversarial not in ("lsgan", "hinge", "none"):
            raise InputError(source, f"adversarial must be lsgan, hinge or none, not {config.adversarial!r}")
        from ..synthesis.normalize import NORMALIZATIONS

        if config.normalization not in NORMALIZATIONS:
            raise InputError(source, f"normalization must be one of {list(NORMALIZATIONS)}, "
                                     f"not {config.normalization!r}")
        if config.cv_fold is not None:
            if not 0 <= config.cv_fold < len(config.cv_folds):
                raise InputError(source, f"cv_fold {config.cv_fold}: the config has {len(config.cv_folds)} cv_folds")
            names = [name for fold in config.cv_folds for name in fold]
            if len(names) != len(set(names)):
                raise InputError(source, "cv_folds share cases: each case must be in exactly one fold")
            if config.val_cases and sorted(config.val_cases) != sorted(config.cv_folds[config.cv_fold]):
                raise InputError(source, "val_cases and cv_fold disagree: give one of them")
            config.val_cases = list(config.cv_folds[config.cv_fold])
        if config.network.kind == "inpainting" and config.normalization != "tissue_zscore":
            raise InputError(source, "an inpainting network normalises each case against its own grey and white "
                                     "matter: normalization must be tissue_zscore")
        if config.patch_size % config.network.size_multiple:
            raise InputError(source, f"patch_size {config.patch_size} is not a multiple of "
                                     f"{config.network.size_multiple}")
        return config


#: Where the training L1 may count (``TrainConfig.l1_region``).
L1_REGIONS = ("patch", "brain")
#: Where the SSIM term may count (``TrainConfig.ssim_region``).
SSIM_REGIONS = ("loss", "tumour")
#: The contrast rules as (channel, darker class, brighter class) in the network's channel order.
RULE_PAIRS = contrast_pairs(MODALITY_ORDER)


def loss_region(l1_region: str, labels: torch.Tensor, inpaint_region: torch.Tensor | None) -> torch.Tensor | None:
    """The (B, 1, ...) 0/1 mask the generator's loss counts in, or ``None`` for the whole patch.

    An inpainting network is scored inside its region (which lies in the brain); a synthesis network inside
    the label map's brain when ``l1_region`` is "brain".
    """
    if inpaint_region is not None:
        return inpaint_region
    if l1_region == "brain":
        return brain_mask(labels).unsqueeze(1).float()
    return None


def ssim_weights(ssim_region: str, counted: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor | None:
    """The (B, 1, ...) mask the SSIM term counts in (``TrainConfig.ssim_region``), ``None`` for the whole patch."""
    if ssim_region == "loss":
        return counted
    tumour = tumour_mask(labels).unsqueeze(1).float()
    return tumour if counted is None else tumour * counted


def outermost_layer_torch(brain: torch.Tensor) -> torch.Tensor:
    """(B, 1, ...) 0/1 mask of the brain's outermost layer: brain voxels with a face neighbour outside the brain.

    The patch's own faces are not the brain's border: the patch is padded by repeating its edge.
    """
    import torch.nn.functional as F

    spatial = brain.dim() - 2
    padded = F.pad(brain.float(), (1, 1) * spatial, mode="replicate")
    kernel = torch.zeros((1, 1) + (3,) * spatial, dtype=padded.dtype, device=padded.device)
    centre = (0, 0) + (1,) * spatial
    kernel[centre] = 1.0
    for axis in range(spatial):
        for offset in (0, 2):
            index = list(centre)
            index[2 + axis] = offset
            kernel[tuple(index)] = 1.0
    conv = F.conv3d if spatial == 3 else F.conv2d
    inside = conv(padded, kernel) > 2 * spatial + 0.5  # the voxel and all its face neighbours in the brain
    return (brain.bool() & ~inside).float()


def loss_weights(counted: torch.Tensor | None, labels: torch.Tensor, rim_weight: float) -> torch.Tensor | None:
    """The L1's voxel weights: ``counted``, with the brain's outermost layer weighted ``rim_weight`` times."""
    if counted is None or rim_weight == 1.0:
        return counted
    rim = outermost_layer_torch(brain_mask(labels).unsqueeze(1))
    return counted + (rim_weight - 1.0) * rim * counted


def paint_into_real(fake: torch.Tensor, real: torch.Tensor, counted: torch.Tensor | None) -> torch.Tensor:
    """The generator's output where the loss counts, the real image elsewhere.

    Only that region is ever used, so the discriminator judges the real image with it painted in, and
    no loss reaches the output outside it (:func:`masked_l1` takes the mean inside).
    """
    return fake if counted is None else counted * fake + (1 - counted) * real


def _check_values(config: TrainConfig, source: str) -> None:
    """Ranges of the training options (their types are checked by ``check_fields``)."""
    from ..schema.jsonshape import check_range

    for name in ("steps", "patch_size", "batch_size", "checkpoint_every", "val_every", "log_every"):
        check_range(source, name, getattr(config, name), 1)
    check_range(source, "patch_size", config.patch_size, 1, 512)
    check_range(source, "batch_size", config.batch_size, 1, 1024)
    check_range(source, "lr", config.lr, 0, 1)  # 0 freezes the weights (a run that only evaluates a start)
    for index, beta in enumerate(config.betas):
        check_range(source, f"betas[{index}]", beta, 0, 1)
    for name in ("lr_decay_fraction", "tumour_fraction", "inpaint_tumour_fraction"):
        check_range(source, name, getattr(config, name), 0, 1)
    for name in ("lambda_l1", "lambda_ssim", "lambda_floor", "lambda_class_level", "lambda_wide_contrast", "rotate_deg",
                 "scale", "intensity", "divergence_window", "grad_clip"):
        check_range(source, name, getattr(config, name), 0)
    check_range(source, "floor_code_spread", config.floor_code_spread, 0, 10)
    if config.floor_code_spread > 0 and not (config.lambda_floor > 0 and config.network.has_style):
        raise InputError(source, "floor_code_spread holds wide appearance codes above the floor: it needs "
                                 "lambda_floor above 0 and a network with an appearance code (style_dim)")
    if config.adversarial_wide_codes and not (config.floor_code_spread > 0 and config.adversarial != "none"):
        raise InputError(source, "adversarial_wide_codes judges the renderings of floor_code_spread's wide codes: "
                                 "it needs floor_code_spread above 0 and an adversarial term")
    check_range(source, "wide_contrast_keep", config.wide_contrast_keep, 0, 1)
    if config.lambda_wide_contrast > 0 and config.floor_code_spread <= 0:
        raise InputError(source, "lambda_wide_contrast keeps the contrast of floor_code_spread's wide codes: it "
                                 "needs floor_code_spread above 0")
    if config.ssim_interior and config.lambda_ssim == 0:
        raise InputError(source, "ssim_interior shapes the SSIM term: it needs lambda_ssim above 0")
    if config.ssim_region not in SSIM_REGIONS:
        raise InputError(source, f"ssim_region must be one of {list(SSIM_REGIONS)}, not {config.ssim_region!r}")
    if config.ssim_region != "loss" and config.lambda_ssim == 0:
        raise InputError(source, "ssim_region places the SSIM term: it needs lambda_ssim above 0")
    if not config.ssim_contrast and config.lambda_ssim == 0:
        raise InputError(source, "ssim_contrast shapes the SSIM term: it needs lambda_ssim above 0")
    if config.ssim_offset != 0 and config.lambda_ssim == 0:
        raise InputError(source, "ssim_offset shapes the SSIM term: it needs lambda_ssim above 0")
    if config.lambda_ssim > 0 and config.normalization not in ZSCORE_KINDS:
        raise InputError(source, "lambda_ssim scores SSIM on the z scale of MedSynth's metrics: it needs a z-score "
                                 f"normalization ({', '.join(ZSCORE_KINDS)}), not {config.normalization!r}")
    if config.lambda_floor > 0 and config.normalization not in ZSCORE_KINDS:
        raise InputError(source, "lambda_floor needs the floor of a z-score normalization "
                                 f"({', '.join(ZSCORE_KINDS)}), not {config.normalization!r}")
    check_range(source, "seed", config.seed, 0, 2 ** 32 - 1)
    check_range(source, "appearance_patches", config.appearance_patches, 0, 1_000_000)
    if config.appearance_patches == 1:
        raise InputError(source, "appearance_patches must be 0 (no appearance prior) or at least 2 (a covariance)")
    if config.threads is not None:
        check_range(source, "threads", config.threads, 1, 4096)
    low, high = (tuple(config.inpaint_margin_range) + (0.0, 0.0))[:2]
    if len(config.inpaint_margin_range) != 2 or not 0 <= low <= high <= 64:
        raise InputError(source, f"inpaint_margin_range must be two voxel counts 0 <= min <= max <= 64, got "
                                 f"{list(config.inpaint_margin_range)}")
    if len(config.betas) != 2:
        raise InputError(source, f"betas must be two numbers, got {list(config.betas)}")
    if config.l1_region not in L1_REGIONS:
        raise InputError(source, f"l1_region must be one of {list(L1_REGIONS)}, not {config.l1_region!r}")
    if config.rim_weight != 1.0 and config.l1_region != "brain":
        raise InputError(source, "rim_weight weights the brain's outermost layer in the brain-only L1: it needs "
                                 f"l1_region 'brain', not {config.l1_region!r}")
    check_range(source, "rim_weight", config.rim_weight, 1.0, 1000.0)
    if config.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise InputError(source, f"precision must be auto, fp32, bf16 or fp16, not {config.precision!r}")


# --- distributed helpers -----------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Dist:
    """Join the torchrun process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    backend = "nccl" if device_kind == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank)


def _barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


# --- checkpoints -------------------------------------------------------------------------------


def save_checkpoint(run_dir: Path, step: int, generator: nn.Module, discriminator: nn.Module | None,
                    opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer | None,
                    scaler_state: dict[str, Any] | None, elapsed_s: float = 0.0,
                    losses: dict[str, float] | None = None) -> Path:
    """Write ``checkpoints/step_N`` atomically and point ``checkpoints/latest.json`` at it (one step for Ctrl+C).

    ``losses`` (the step's own) go into its ``state.json``: a resume of a run stopped after its last checkpoint
    exports them as the model's final losses, as the uninterrupted run does.
    """
    from .checkpoint import write_checkpoint

    folder = run_dir / "checkpoints"
    # A final validation scored an earlier checkpoint (a run rewound, or extended): never this one's.
    (folder / FINAL_VALIDATION).unlink(missing_ok=True)
    final = write_checkpoint(folder / f"step_{step:07d}", step,
                             {"generator": generator, "discriminator": discriminator if opt_d is not None else None},
                             {"optimizer_g": opt_g, "optimizer_d": opt_d if discriminator is not None else None},
                             on_placed=lambda placed: write_json({"step": step, "path": placed.name},
                                                                 folder / "latest.json", overwrite=True),
                             scaler=scaler_state, elapsed_s=round(elapsed_s, 1), losses=dict(losses or {}))
    # Keep the two newest checkpoints.
    for old in sorted(folder.glob("step_*"))[:-2]:
        shutil.rmtree(old, ignore_errors=True)
    return final


CHECKPOINT_NAME = re.compile(r"step_(\d{7})")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint folder ``checkpoints/latest.json`` names (``None`` when there is none yet).

    The name must be a checkpoint folder inside the run's ``checkpoints/`` (``step_NNNNNNN``):
    a path elsewhere is refused, never followed.
    """
    from ..schema.jsonshape import read_json

    latest = run_dir / "checkpoints" / "latest.json"
    if not latest.exists():
        return None
    record = read_json(latest, "checkpoint pointer")
    name = record.get("path")
    if not isinstance(name, str) or not CHECKPOINT_NAME.fullmatch(name):
        raise InputError(latest, f"'path' must name a checkpoint folder step_NNNNNNN inside "
                                 f"{run_dir / 'checkpoints'}, not {json.dumps(name)[:80]}")
    folder = run_dir / "checkpoints" / name
    if not folder.is_dir():
        raise InputError(latest, f"names the checkpoint {name}, which does not exist")
    return folder


def _interrupted_message(run_dir: Path, total_steps: int, data: Path | list[Path] | None = None, *,
                         cache: Path | None = None, distributed: bool = False) -> str:
    """What an interrupted run can resume from: the step its last checkpoint holds (the step counter may be
    one short of it or past it, depending on where the interruption fell), and the command that resumes it:
    the run's --data, -o and --cache as given, plus --resume (the run's record holds the rest)."""
    try:
        folder = latest_checkpoint(run_dir)
    except MedSynthError:
        folder = None
    if folder is None:
        if any(CHECKPOINT_NAME.fullmatch(p.name) for p in (run_dir / "checkpoints").glob("step_*")):
            # A folder from before the pointer was written with it (or a copy put there by hand): not resumed from.
            return ("\ninterrupted before a checkpoint was recorded in checkpoints/latest.json: the run starts again "
                    "from step 0")
        return "\ninterrupted before the first checkpoint: the run starts again from step 0"
    step = int(CHECKPOINT_NAME.fullmatch(folder.name).group(1))
    folders = [data] if isinstance(data, (str, Path)) else list(data or [])
    words = ["train", "--data", *([str(f) for f in folders] or ["CASES_DIR"]), "-o", str(run_dir),
             *(["--cache", str(cache)] if cache is not None else []), "--resume"]
    resume = " ".join(shlex.quote(w) for w in words)
    held = f"\ninterrupted; its last checkpoint holds step {step} of {total_steps}; to continue from there, "
    if distributed:  # torchrun's own options are not known here
        return held + f"start the same torchrun command with --resume added to its medsynth options ({resume})"
    return held + f"run:\n  medsynth {resume}"


def load_checkpoint(run_dir: Path, generator: nn.Module, discriminator: nn.Module | None,
                    opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer | None
                    ) -> tuple[int, Any, float, dict[str, float]]:
    """Load the latest checkpoint; returns its step, loss-scaler state, training seconds and the step's losses
    (empty for checkpoints written before they were kept)."""
    from .checkpoint import STATE_NAME, read_checkpoint

    folder = latest_checkpoint(run_dir)
    if folder is None:
        raise InputError(run_dir, "nothing to resume: no checkpoints/latest.json")
    with_d = discriminator is not None and opt_d is not None
    meta = read_checkpoint(folder, {"generator": generator, "discriminator": discriminator if with_d else None},
                           {"optimizer_g": opt_g, "optimizer_d": opt_d if with_d else None})
    losses = meta.get("losses") or {}
    if not (isinstance(losses, dict) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                             for v in losses.values())):
        raise InputError(folder / STATE_NAME, "'losses' must map each loss to a number")
    return int(meta["step"]), meta.get("scaler"), float(meta.get("elapsed_s", 0.0) or 0.0), losses


def learning_rate_factor(config: TrainConfig, step: int) -> float:
    """pix2pix's rule: 1, then linear decay to zero over the last ``lr_decay_fraction`` of the steps."""
    decay_steps = config.steps * config.lr_decay_fraction
    if decay_steps <= 0:
        return 1.0
    return min(1.0, (config.steps - step) / decay_steps)


def learning_rate(config: TrainConfig, step: int) -> float:
    """The learning rate of ``step`` (what :func:`lr_scheduler` sets for it)."""
    return config.lr * learning_rate_factor(config, step)


def lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                 start: int) -> torch.optim.lr_scheduler.LambdaLR:
    """torch's ``LambdaLR`` with pix2pix's rule, positioned at ``start`` (a resumed run continues its schedule).

    The rate is the closed form ``lr * factor(step)``, never a product of per-step factors, so a resumed
    run's rates equal the uninterrupted run's bit for bit.
    """
    for group in optimizer.param_groups:
        group["initial_lr"] = config.lr  # the base the rule scales; a checkpoint's lr is already decayed
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(config, step),
                                             last_epoch=start - 1)


# --- losses ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _least_squares() -> nn.Module:
    """MONAI's patch adversarial loss, least squares on the raw scores (LSGAN: real -> 1, fake -> 0)."""
    from monai.losses import PatchAdversarialLoss

    return PatchAdversarialLoss(criterion="least_squares", no_activation_leastsq=True)


def _clip_gradients(scaler: Any, optimizer: torch.optim.Optimizer, network: nn.Module, max_norm: float) -> float:
    """Clips ``network``'s gradients to ``max_norm`` in place (after undoing the loss scale, if any) and returns
    their norm before clipping."""
    scaler.unscale_(optimizer)
    return float(torch.nn.utils.clip_grad_norm_(network.parameters(), max_norm))


def discriminator_loss(kind: str, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's loss on its scores of real and of generated patches.

    LSGAN through MONAI's ``PatchAdversarialLoss``.  Hinge stays written out: MONAI's hinge criterion
    passes the scores through tanh first, which is another loss than the hinge MedSynth trains with.
    """
    if kind == "hinge":
        return torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()
    loss = _least_squares()
    return 0.5 * (loss(real, target_is_real=True, for_discriminator=True)
                  + loss(fake, target_is_real=False, for_discriminator=True))


def generator_adversarial_loss(kind: str, fake: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial loss on the discriminator's scores of its patches."""
    if kind == "hinge":
        return -fake.mean()
    return _least_squares()(fake, target_is_real=True, for_discriminator=False)


# --- the run -----------------------------------------------------------------------------------


def _intensity_statistics(volumes: list[TrainingVolume]) -> dict[str, dict[str, Any]]:
    """Mean normalisation statistics per modality: how outputs map back to scanner units.

    A z-score model also keeps a floor: the median over its cases of each brain's darkest signal
    (:func:`~MedSynthLib.synthesis.normalize.signal_floor_z`), so no synthetic brain voxel comes out 0.
    """
    from ..synthesis.normalize import HealthyTissueZScore, mean_normalizer, with_signal_floor

    statistics = {}
    floors = signal_floors_z(volumes)
    for m in MODALITY_ORDER:
        normalizer = mean_normalizer([v.normalizers[m] for v in volumes])  # one kind for all cases, or it refuses
        if isinstance(normalizer, HealthyTissueZScore):
            normalizer = with_signal_floor(normalizer, floors[m])
        statistics[m] = normalizer.to_json()
    return statistics


def signal_floors_z(volumes: list[TrainingVolume]) -> dict[str, float]:
    """Per contrast, the median over the z-scored cases of each brain's darkest signal, in z (the model's floor)."""
    from ..synthesis.normalize import HealthyTissueZScore, signal_floor_z

    floors = {}
    for c, m in enumerate(MODALITY_ORDER):
        per_case = [signal_floor_z(v.images[c], brain_mask(v.labels), v.normalizers[m])
                    for v in volumes if isinstance(v.normalizers[m], HealthyTissueZScore)]
        if per_case:
            floors[m] = float(np.median(per_case))
    return floors


def counted_classes(cond: torch.Tensor, counted: torch.Tensor | None) -> torch.Tensor:
    """The condition's one-hot label classes, limited to where the loss counts (``counted``; ``None``: everywhere)."""
    classes = cond[:, :NUM_CLASSES]
    return classes if counted is None else classes * counted


def below_floor(prediction: torch.Tensor, floor: torch.Tensor, counted: torch.Tensor | None) -> torch.Tensor:
    """The mean, over the voxels and contrasts where the loss counts, of how far ``prediction`` lies below ``floor``.

    Args:
        prediction: (B, C, ...) output in the network's units.
        floor: (C,) the floor of each contrast in the same units.
        counted: (B, 1, ...) 0/1 mask, or ``None`` for every voxel.
    """
    shortfall = torch.relu(floor.view(1, -1, *([1] * (prediction.dim() - 2))) - prediction.float())
    if counted is None:
        return shortfall.mean()
    return (shortfall * counted).sum() / (counted.sum() * prediction.shape[1]).clamp(min=1.0)


def train(data: Path | list[Path], run_dir: Path, config: TrainConfig, *, resume: bool = False,
          device: str = "auto", command: str = "", progress: bool = True, cache_dir: Path | None = None,
          steps: int | None = None, given: dict[str, Any] | None = None) -> Path:
    """Train a model; returns the exported model folder ``RUN_DIR/model``.

    ``cache_dir`` (default ``RUN_DIR/cache``) holds the prepared cases; several
    runs on the same data (folds, ablations) can share one.  ``steps`` with
    ``resume`` changes the run's total number of steps (extend, or shorten before
    the learning-rate decay begins, which matches a run planned that way from the
    start); the change is recorded in ``train_config.json``.  ``given`` holds what a resume's command
    line asked for (``config``: a config's JSON; ``precision``, ``threads``, ``init_from``, ``cv_fold``):
    a resume continues the run as recorded, so any of them that differs from the record is refused.

    One run at a time per run folder: the run holds the folder's output lock (``.RUN.medsynth-lock`` beside it)
    from its first look at the folder to the model's export; another run on it is refused at once.
    """
    from ..synthesis.inference import pick_device

    dev = pick_device(device)
    d = init_distributed(dev.type)
    if dev.type == "cuda":
        dev = torch.device("cuda", d.local_rank)
    run_dir = Path(run_dir)
    shown = _VALIDATION_PROGRESS.set(d.main and progress)
    try:
        with _holding_run_folder(run_dir, d, dev):
            return _train(data, run_dir, config, dev, d, resume=resume, command=command, progress=progress,
                          cache_dir=cache_dir, steps=steps, given=given)
    finally:
        _VALIDATION_PROGRESS.reset(shown)


#: Whether :func:`validate` shows a bar per held-out case: set by :func:`train` for its run (a context variable,
#: so that validate keeps the signature its callers and tests wrap).
_VALIDATION_PROGRESS: contextvars.ContextVar[bool] = contextvars.ContextVar("validation_progress", default=False)


@contextlib.contextmanager
def _holding_run_folder(run_dir: Path, d: Dist, device: torch.device) -> Iterator[None]:
    """Hold ``run_dir``'s output lock (rank 0) for the block; refuse on every rank when another run holds it.

    Two runs on one folder interleaved their checkpoints, records and model. Folders above ``run_dir`` that the
    lock file made and the run did not fill are removed again (a refused command writes nothing).
    """
    from ..schema.outputs import output_lock

    target = run_dir.resolve()
    missing = [folder for folder in (target.parent, *target.parent.parents) if not folder.exists()]
    held = contextlib.ExitStack()
    refused = False
    if d.main:
        try:
            held.enter_context(output_lock(target, wait=False))
        except BlockingIOError:
            refused = True
    if d.world > 1:
        import torch.distributed as dist

        flag = torch.tensor([1.0 if refused else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        refused = bool(flag.item())
    try:
        with held:
            if refused:
                raise InputError(run_dir, "another medsynth train run holds this run folder (one run at a time): "
                                          "wait for it to end, or give another -o")
            yield
    finally:
        if d.main and not target.exists():
            for folder in missing:  # deepest first; stops at the first one that is not empty
                try:
                    folder.rmdir()
                except OSError:
                    break


def _train(data: Path | list[Path], run_dir: Path, config: TrainConfig, dev: torch.device, d: Dist, *,
           resume: bool, command: str, progress: bool, cache_dir: Path | None, steps: int | None,
           given: dict[str, Any] | None) -> Path:
    """The body of :func:`train`, with the run folder held."""
    from ..synthesis.inference import pick_precision

    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(run_dir, "is a file, not a run folder (-o names the folder the run writes)")
    config_path = run_dir / "train_config.json"
    # A run killed (or refused) before its first checkpoint has nothing to resume from: it restarts
    # from step 0, with --resume (under its recorded config) or without (under the given one).
    created = not run_dir.exists()
    was_empty = run_dir.is_dir() and not any(run_dir.iterdir())  # -o named an empty folder: all in it is this run's
    checkpoint = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    unstarted = config_path.exists() and checkpoint is None and not (run_dir / "model").exists()
    if d.main:
        if resume:
            if not config_path.exists():
                raise InputError(run_dir, "nothing to resume: no train_config.json")
        elif run_dir.exists() and any(run_dir.iterdir()) and not unstarted:
            raise MedSynthError(f"{run_dir}: run folder exists and is not empty (use --resume to continue it)")
    recorded: dict[str, Any] = {}
    restart = False  # a --resume of a run with no checkpoint: step 0 again, under the run's record
    if resume and config_path.exists():
        from ..schema.jsonshape import expect_object, read_json

        recorded = read_json(config_path, "run record")
        config = TrainConfig.from_json(expect_object(recorded.get("config"), config_path, "'config'"),
                                       str(config_path))
        if given:
            _check_resume_options(config, recorded, given, config_path)
        if unstarted:
            resume, restart = False, True  # nothing to load: start again from step 0 under the recorded config
            if steps is not None and steps != config.steps:
                config = TrainConfig.from_json({**config.to_json(), "steps": steps}, "command line")
                recorded.setdefault("length_changes", []).append({"at_step": 0, "steps": steps, "command": command})
    elif steps is not None:
        config = TrainConfig.from_json({**config.to_json(), "steps": steps}, "command line")
    # After the config is settled: a resumed run keeps its recorded precision and threads (several runs
    # sharing a CPU each take their share; torch's default of every core would oversubscribe it).
    precision = pick_precision(config.precision, dev)
    # The starting model is recorded when the run begins; a resume reuses the record (the checkpoint holds
    # the weights) and never resolves init_from again, which may name another model from elsewhere. A restart
    # loads the recorded weights again, found by their sha256.
    starting_model = None
    init_model = _recorded_init(recorded, config_path) if resume or restart else None
    if restart and init_model is not None:
        starting_model = _starting_model(config, init_model, config_path)
    elif init_model is None:
        starting_model = _starting_model(config)  # checked before anything is written
        if starting_model is not None:
            init_model = {"name": starting_model.name, "sha256": starting_model.sha256,
                          "training": starting_model.config.get("training", {}).get("commands")}
    if config.threads:
        torch.set_num_threads(config.threads)

    roots = list(data) if isinstance(data, (list, tuple)) else [data]
    data_label = " ".join(str(root) for root in roots)
    sources = cases_by_name([s for root in roots for s in find_case_sources(root, config.normalization)])
    val_names = set(config.val_cases)
    unknown = val_names - set(sources)
    if unknown:
        raise InputError(data_label, f"validation cases {sorted(unknown)} are not among the case folders")
    train_sources = [s for name, s in sources.items() if name not in val_names]
    if not train_sources:
        raise InputError(data_label, "no training cases left after holding out the validation cases")
    fingerprint = _data_fingerprint(list(sources.values()))
    if resume or restart:  # a restart is the same run too: on the data it recorded at its start
        _check_same_data(recorded.get("data"), fingerprint, config_path, d.main)
    cache = Path(cache_dir) if cache_dir is not None else run_dir / "cache"
    if d.main:
        if restart:  # after every check: a refused restart does not announce itself
            print(f"{run_dir}: no checkpoint was written before the run stopped; restarting it from step 0",
                  file=sys.stderr)
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:  # a restart keeps the command that started the run (and any length changes)
            record = {"command": recorded.get("command", command) if restart else command,
                      "config": config.to_json(), "precision": precision, "device": str(dev), "world_size": d.world,
                      "init_model": init_model, "data": {"case_sha256": fingerprint}}
            if recorded.get("length_changes"):
                record["length_changes"] = recorded["length_changes"]
            write_json(record, config_path, overwrite=unstarted)
    _barrier(d)
    try:
        volumes = [_load_volume(s, cache, config.normalization, fingerprint[s.name])
                   for s in _progress_iter(train_sources, "prepare", d.main and progress)]
        val_volumes = [_load_volume(s, cache, config.normalization, fingerprint[s.name])
                       for name, s in sources.items() if name in val_names]
    except MedSynthError:
        if d.main:  # bad data: leave no run folder behind where this run made it, nothing in it where it was empty
            if created:
                shutil.rmtree(run_dir, ignore_errors=True)
            elif was_empty:
                for made in run_dir.iterdir():
                    if made.is_dir() and not made.is_symlink():
                        shutil.rmtree(made, ignore_errors=True)
                    else:
                        made.unlink(missing_ok=True)
        raise

    floor = None
    if config.lambda_floor > 0:  # the floor the exported model will carry, in the network's units
        floors = signal_floors_z(volumes)
        floor = torch.tensor([floors[m] / ZSCORE_KINDS[config.normalization] for m in MODALITY_ORDER],
                             dtype=torch.float32, device=dev)
    torch.manual_seed(config.seed)
    generator = Generator(config.network)
    adversarial = config.adversarial != "none"
    discriminator = build_discriminator(config.network) if adversarial else None
    opt_g = torch.optim.Adam(generator.parameters(), lr=config.lr, betas=config.betas)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=config.lr, betas=config.betas) if discriminator else None
    start = 0
    scaler_state = None
    elapsed_before = 0.0  # training time of earlier sessions of this run
    history: dict[str, float] = {}  # the last step's losses (the model record's final_losses)
    if starting_model is not None and not resume:  # on resume the checkpoint holds the weights
        from ..synthesis.models import load_generator

        generator.load_state_dict(load_generator(starting_model, "cpu", backend="monai").state_dict())
    if resume:
        start, scaler_state, elapsed_before, history = load_checkpoint(run_dir, generator, discriminator, opt_g,
                                                                       opt_d)
        if steps is not None and steps < start:  # the length asked for is what is wrong, finished run or not
            raise InputError(run_dir, f"--steps {steps} is below the checkpoint's step {start}")
        if steps is None and start > config.steps:  # only a checkpoint changed after it was written gets here
            raise InputError(run_dir, f"the checkpoint's step {start} is past the run's {config.steps} steps: its "
                                      "checkpoint files were changed after they were written")
        if start >= (steps or config.steps) and (run_dir / "model").is_dir():  # nothing left to train
            raise InputError(run_dir, f"the run is already complete (step {start} of {config.steps}); "
                                      f"its model is {run_dir / 'model'}")
        if steps is not None and steps != config.steps:
            decay_start = config.steps * (1 - config.lr_decay_fraction)
            if start > min(decay_start, steps * (1 - config.lr_decay_fraction)):
                raise InputError(run_dir, f"--steps {steps}: the learning-rate decay has begun at step "
                                          f"{int(decay_start)}; changing the length now would change the schedule")
            config = TrainConfig.from_json({**config.to_json(), "steps": steps}, "command line")
            if d.main:
                recorded["config"] = config.to_json()
                recorded.setdefault("length_changes", []).append({"at_step": start, "steps": steps,
                                                                   "command": command})
                write_json(recorded, config_path, overwrite=True)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(generator)
    generator.to(dev)
    if discriminator is not None:
        discriminator.to(dev)
    for opt in (opt_g, opt_d):
        if opt is not None:  # optimizer state follows the parameters' device
            for state in opt.state.values():
                for key, value in state.items():
                    if torch.is_tensor(value) and key != "step":
                        state[key] = value.to(dev)
    g_model: nn.Module = generator
    d_model: nn.Module | None = discriminator
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [dev.index] if dev.type == "cuda" else None
        g_model = DDP(generator, device_ids=ids)
        d_model = DDP(discriminator, device_ids=ids) if discriminator is not None else None
    schedulers = [lr_scheduler(opt, config, start) for opt in (opt_g, opt_d) if opt is not None]
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
    if scaler_state:
        scaler.load_state_dict(scaler_state)
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision != "fp32" else torch.autocast(dev.type, enabled=False))
    sampler = patch_sampler(config)
    inpainting = config.network.kind == "inpainting"
    regions = RegionSampler(config.inpaint_tumour_fraction, config.inpaint_margin_range)
    writer = None
    if d.main:
        from torch.utils.tensorboard import SummaryWriter

        # TensorBoard hides what an earlier session logged from purge_step on: the steps this session trains again.
        # A checkpoint's own step was logged before the checkpoint was written and is not trained again, so a resume
        # keeps it (purging from it lost that step's losses, the final step's included).
        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1 if resume else start)
    bar = _bar(config.steps, start, d.main and progress)
    guard = DivergenceGuard(config.steps, start, config.divergence_window)
    final_metrics: dict[str, Any] | None = None
    step = start
    started = time.perf_counter()
    try:
        for step in range(start, config.steps):
            labels, real = sampler.sample(volumes, config.seed, step, d.rank, config.batch_size, dev)
            region = regions.sample(labels.cpu(), config.seed, step, d.rank).to(dev) if inpainting else None
            counted = loss_region(config.l1_region, labels, region)
            cond = one_hot(labels)
            if region is not None:
                from ..synthesis.inpainting import inpainting_condition

                cond = inpainting_condition(cond, real, region)
            kl = fake_wide = None
            with autocast:
                if config.network.has_style:
                    # The appearance code is encoded from the real patch; its reparameterisation noise is
                    # drawn from (seed, step, rank) like the patch, so a resumed run repeats it exactly.
                    noise = torch.randn((cond.shape[0], config.network.style_dim),
                                        generator=torch.Generator().manual_seed(_noise_seed(config.seed, step, d.rank)))
                    wide = None
                    if config.floor_code_spread > 0:
                        wide = config.floor_code_spread * torch.randn(
                            (cond.shape[0], config.network.style_dim),
                            generator=torch.Generator().manual_seed(_noise_seed(config.seed, step, d.rank, stream=2)))
                    fake, kl = g_model(cond, reference=real, noise=noise.to(dev),
                                       extra_styles=None if wide is None else wide.to(dev))
                    if wide is not None:
                        fake, fake_wide = fake[:cond.shape[0]], fake[cond.shape[0]:]
                else:
                    fake = g_model(cond)
            fake = paint_into_real(fake, real, counted)
            judged_wide = (paint_into_real(fake_wide, real, counted)
                           if fake_wide is not None and config.adversarial_wide_codes else None)
            logs: dict[str, float] = {}
            if d_model is not None and opt_d is not None:
                opt_d.zero_grad(set_to_none=True)
                pairs = [torch.cat([cond, real], 1), torch.cat([cond, fake.detach()], 1)]
                if judged_wide is not None:  # judged as generated, beside the encoded code's rendering
                    pairs.append(torch.cat([cond, judged_wide.detach()], 1))
                with autocast:
                    # Real and fake pairs in one forward pass (DDP syncs once per backward).
                    scores = d_model(torch.cat(pairs, 0))[-1].float()
                n = cond.shape[0]
                loss_d = discriminator_loss(config.adversarial, scores[:n], scores[n:])
                scaler.scale(loss_d).backward()
                if config.grad_clip > 0:
                    logs["grad_norm/discriminator"] = _clip_gradients(scaler, opt_d, discriminator, config.grad_clip)
                scaler.step(opt_d)
                logs["loss/discriminator"] = loss_d.item()
            opt_g.zero_grad(set_to_none=True)
            weights = loss_weights(counted, labels, config.rim_weight)
            loss_l1 = masked_l1(fake.float(), real, weights)
            loss_g = config.lambda_l1 * loss_l1
            ssim_counted = ssim_weights(config.ssim_region, counted, labels)
            # A patch without tumour adds no term when the SSIM term counts in the tumour only.
            if config.lambda_ssim > 0 and (ssim_counted is None or bool(ssim_counted.any())):
                # The network's units are z / scale: the metrics' data range of 8 z, in those units.
                loss_ssim = masked_ssim_loss(fake, real, ssim_counted, DATA_RANGE / ZSCORE_KINDS[config.normalization],
                                             interior=config.ssim_interior, contrast=config.ssim_contrast,
                                             offset=config.ssim_offset)
                loss_g = loss_g + config.lambda_ssim * loss_ssim
                logs["loss/ssim"] = loss_ssim.item()
            if config.lambda_class_level > 0:
                classes = counted_classes(cond, counted)
                loss_level = class_level_loss(fake, real, classes)
                loss_g = loss_g + config.lambda_class_level * loss_level
                logs["loss/class_level"] = loss_level.item()
            if floor is not None:
                loss_floor = below_floor(fake, floor, counted)
                loss_g = loss_g + config.lambda_floor * loss_floor
                logs["loss/below_floor"] = loss_floor.item()
                if fake_wide is not None:
                    loss_floor_wide = below_floor(fake_wide, floor, counted)
                    loss_g = loss_g + config.lambda_floor * loss_floor_wide
                    logs["loss/below_floor_wide_codes"] = loss_floor_wide.item()
            if fake_wide is not None and config.lambda_wide_contrast > 0:
                classes = counted_classes(cond, counted)
                loss_contrast = contrast_order_loss(fake_wide, real, classes, RULE_PAIRS, config.wide_contrast_keep)
                loss_g = loss_g + config.lambda_wide_contrast * loss_contrast
                logs["loss/wide_codes_contrast"] = loss_contrast.item()
            if kl is not None:
                loss_g = loss_g + config.style_kl_weight * kl
                logs["loss/style_kl"] = kl.item()
            if discriminator is not None:
                for key, images in (("generator_adversarial", fake), ("generator_adversarial_wide_codes", judged_wide)):
                    if images is None:
                        continue
                    with autocast:
                        # The bare module: the generator's update must not sync or step the discriminator.
                        score = discriminator(torch.cat([cond, images], 1))[-1].float()
                    loss_adv = generator_adversarial_loss(config.adversarial, score)
                    loss_g = loss_g + loss_adv
                    logs[f"loss/{key}"] = loss_adv.item()
            if not torch.isfinite(loss_g.detach()):
                raise MedSynthError(f"{run_dir}: the generator loss became {float(loss_g)} at step {step + 1}; "
                                    "the run stops here (try --precision fp32 or a lower lr) and exports nothing")
            scaler.scale(loss_g).backward()
            if config.grad_clip > 0:
                logs["grad_norm/generator"] = _clip_gradients(scaler, opt_g, generator, config.grad_clip)
            scaler.step(opt_g)
            scaler.update()
            for scheduler in schedulers:
                scheduler.step()
            logs["loss/l1"] = loss_l1.item()
            history = logs
            done = step + 1
            guard.record(logs["loss/l1"], real, weights)
            if done % config.log_every == 0 and guard.due(done):
                _stop_if_diverged(guard.verdict(done), run_dir, d, dev)
            if writer is not None and (done % config.log_every == 0 or done == config.steps):
                for key, value in logs.items():
                    writer.add_scalar(key, value, done)
                writer.add_scalar("time/seconds_per_step", (time.perf_counter() - started) / (done - start), done)
            if bar is not None:
                bar.set_postfix_str(f"L1 {logs['loss/l1']:.3f}")
                bar.update(1)
            if done % config.checkpoint_every == 0 or done == config.steps:
                if d.main:
                    save_checkpoint(run_dir, done, generator, discriminator, opt_g, opt_d,
                                    scaler.state_dict() if scaler.is_enabled() else None,
                                    elapsed_before + time.perf_counter() - started, history)
                _barrier(d)
            if d.main and val_volumes and (done % config.val_every == 0 or done == config.steps):
                # The last step's validation is the model record's (per case): the held-out cases once.
                metrics = validate(generator, config.network, val_volumes, dev, precision, run_dir, done,
                                   detailed=done == config.steps)
                _log_validation(writer, metrics, done)
                if done == config.steps:
                    final_metrics = metrics
                    _record_final_validation(run_dir, writer, metrics, done)
        if d.main and final_metrics is None and val_volumes and start == config.steps:
            # Interrupted after its final validation was logged (while the model was exported): that one is the
            # run's, logged already; validating again logged each val/* scalar twice.
            final_metrics = _recorded_final_validation(run_dir, config.steps)
        if d.main and final_metrics is None and val_volumes:
            # A resume of a run stopped after its last checkpoint (in its final validation): validated here, before
            # the writer closes, so its TensorBoard shows the last step's validation as the uninterrupted run's does.
            final_metrics = validate(generator, config.network, val_volumes, dev, precision, run_dir, config.steps,
                                     detailed=True)
            _log_validation(writer, final_metrics, config.steps)
    except KeyboardInterrupt:
        if d.main:
            print(_interrupted_message(run_dir, config.steps, data, cache=cache_dir,
                                       distributed=d.world > 1 or "TORCHELASTIC_RUN_ID" in os.environ),
                  file=sys.stderr)
        raise
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    model_dir = run_dir / "model"
    if d.main:
        val_metrics = final_metrics or {}
        continued = resume or restart
        commands = [recorded.get("command", command) if continued else command]
        commands += [change["command"] for change in recorded.get("length_changes", [])
                     if change.get("command") and change["command"] not in commands]
        if continued and command not in commands:
            commands.append(command)
        appearance = fit_export_appearance(generator, config, sampler, volumes, dev, progress)
        export_model(model_dir, generator, config, volumes, commands, val_metrics, history,
                     elapsed_before + time.perf_counter() - started, precision, str(dev), d.world, init_model,
                     appearance)
    _barrier(d)
    if d.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return model_dir


FINAL_VALIDATION = "final_validation.json"


def _record_final_validation(run_dir: Path, writer: Any, metrics: dict[str, Any], step: int) -> None:
    """Keep the final validation beside the checkpoint it scored, once TensorBoard holds it, for a resume."""
    if writer is not None:
        writer.flush()
    write_json({"step": step, "metrics": metrics}, run_dir / "checkpoints" / FINAL_VALIDATION, overwrite=True)


def _recorded_final_validation(run_dir: Path, step: int) -> dict[str, Any] | None:
    """The final validation a run recorded at ``step`` (None: none, or one of another length)."""
    path = run_dir / "checkpoints" / FINAL_VALIDATION
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("step") != step or not isinstance(record.get("metrics"), dict):
        return None
    return record["metrics"]


def _log_validation(writer: Any, metrics: dict[str, Any], step: int) -> None:
    """A validation's summary scores as TensorBoard scalars ``val/<region>_<metric>`` at ``step`` (no writer: none)."""
    if writer is None:
        return
    for key, value in metrics.items():
        if isinstance(value, float):
            writer.add_scalar(f"val/{key}", value, step)


def _stop_if_diverged(message: str | None, run_dir: Path, d: Any, device: torch.device) -> None:
    """Raise on every rank when any rank's divergence guard fired (the ranks see different patches).

    Nothing is saved: the last checkpoint before this point stays the one to start from.
    """
    stop = message is not None
    if d.world > 1:
        import torch.distributed as dist

        flag = torch.tensor([1.0 if stop else 0.0], device=device)  # this rank's device (NCCL needs the GPU)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item())
    if stop:
        raise MedSynthError(f"{run_dir}: {message or 'another rank found that the generator has not learned'}")


def _noise_seed(seed: int, step: int, rank: int, stream: int = 1) -> int:
    """A seed for torch's generator derived from (seed, step, rank), independent of the patch draw's.

    ``stream`` 1: the appearance code's reparameterisation; 2: the wide codes of ``floor_code_spread``."""
    return int(np.random.SeedSequence([seed, step, rank, stream]).generate_state(1)[0])


#: Options a resume's command line may repeat but not change (each changes the run's result; the thread
#: count too: a CPU run is exact on a resume only with the same threads).
RESUME_OPTIONS = {"precision": "--precision", "threads": "--threads", "init_from": "--init", "cv_fold": "--fold"}


def _check_resume_options(config: TrainConfig, recorded: dict[str, Any], given: dict[str, Any],
                          source: Path) -> None:
    """Refuse a resume whose command line asks for another config, precision, threads, model or fold."""
    ours = config.to_json()
    differ = []
    if given.get("config") is not None:
        # The options set on the start's command line and the length (--steps) come from the record.
        asked = TrainConfig.from_json({**given["config"], **{k: ours[k] for k in RESUME_OPTIONS},
                                       "steps": config.steps}, "--config").to_json()
        keys = sorted(k for k in ours if asked.get(k) != ours[k])
        if keys:
            differ.append(f"--config ({', '.join(keys)})")
    for key, option in RESUME_OPTIONS.items():
        value = given.get(key)
        if value is None:
            continue
        init = recorded.get("init_model")
        if key == "init_from" and isinstance(init, dict) and isinstance(init.get("sha256"), str):
            from ..synthesis.models import resolve_model

            if resolve_model(value).sha256 != init["sha256"]:
                differ.append(f"--init {value} (the run started from {init.get('name')}, sha256 "
                              f"{init['sha256'][:12]})")
        elif value != ours[key]:
            differ.append(f"{option} {value} (recorded {json.dumps(ours[key])})")
    if differ:
        raise InputError(source, "--resume continues the run as recorded; " + "; ".join(differ)
                         + " differ from it (leave them out, or start a new run)")


def _recorded_init(recorded: dict[str, Any], source: Path) -> dict[str, Any] | None:
    """The starting model recorded when the run began (``None``: none, or a record from before it was kept)."""
    init = recorded.get("init_model")
    if init is not None and not (isinstance(init, dict) and isinstance(init.get("sha256"), str)):
        raise InputError(source, "'init_model' must be the starting model's record (name, sha256) or null")
    return init


def _data_fingerprint(sources: list[CaseSource]) -> dict[str, str]:
    """Each case's name and the content sha256 the model record keeps for it (a prepared set records it)."""
    from .data import case_key

    return {s.name: s.key if s.key is not None else case_key(s.origin) for s in sources}


def _load_volume(source: CaseSource, cache: Path, normalization: str, key: str) -> TrainingVolume:
    """A case's training volume: from its prepared set (checked against the set's record), or prepared from its
    folder (through ``cache``)."""
    if source.prepared is not None:
        return load_prepared_volume(source, normalization)
    return prepare_volume(source.origin, cache, normalization, key)


def _check_same_data(recorded: Any, current: dict[str, str], source: Path, notice: bool) -> None:
    """Refuse a resume on other cases than the run began with (names or contents)."""
    if recorded is None:
        if notice:
            print(f"{source}: no record of its training data (a run from an older version); the data given "
                  "now is not checked against it", file=sys.stderr)
        return
    cases = recorded.get("case_sha256") if isinstance(recorded, dict) else None
    if not isinstance(cases, dict):
        raise InputError(source, "'data' must hold 'case_sha256': {case: sha256}")
    missing = sorted(set(cases) - set(current))
    new = sorted(set(current) - set(cases))
    changed = sorted(name for name in set(cases) & set(current) if cases[name] != current[name])
    parts = [f"{what} {names}" for what, names in (("missing", missing), ("new", new), ("changed", changed)) if names]
    if parts:
        raise InputError(source, "--data is not the data this run was trained on: cases " + "; ".join(parts))


def _starting_model(config: TrainConfig, recorded: dict[str, Any] | None = None,
                    source: Path | None = None) -> "ModelCard | None":
    """The verified model of ``config.init_from`` (hash and schema checked), or ``None``.

    With ``recorded`` (the run's ``init_model``, read from ``source``): the model with the recorded weights, by
    their sha256 (``init_from``, else any registered model), refused when none has them.
    A fine-tune keeps the architecture: the model's network has to equal the config's (the
    parameter-free anti-aliasing may be switched on).
    """
    from ..synthesis.models import resolve_model

    if recorded is not None:
        model = _recorded_model(config.init_from, recorded, source)
    elif not config.init_from:
        return None
    else:
        model = resolve_model(config.init_from)
    # The anti-aliasing blur has no parameters: a model without it may start a run with it.
    theirs = replace(model.network, antialias=config.network.antialias)
    if theirs != config.network:
        from .checkpoint import network_differences

        differ = network_differences(theirs.to_json(), config.network.to_json(), "the model", "the training config")
        raise InputError(model.path, f"cannot start from this model: its network differs ({differ})")
    return model


def _recorded_model(init_from: str | None, recorded: dict[str, Any], source: Path | None) -> "ModelCard":
    """The model whose weights have the sha256 ``recorded`` holds: ``init_from`` where it still has them, else a
    registered model that has them."""
    from ..synthesis.models import read_registry, resolve_model

    wanted = recorded["sha256"]
    found = None
    if init_from:
        try:
            model = resolve_model(init_from)
            found = f"{init_from} now has sha256 {model.sha256[:12]}..."
            if model.sha256 == wanted:
                return model
        except MedSynthError as exc:
            found = f"{init_from}: {' '.join(str(exc).split())[:120]}"
    for name, entry in read_registry().get("models", {}).items():
        if entry.get("sha256") == wanted:
            return resolve_model(name)
    raise InputError(source, f"the run started from model {recorded.get('name')} (sha256 {wanted[:12]}...), which "
                             f"is no longer available ({found or 'no model is named'}; no registered model has "
                             "those weights): restore it to restart the run, or start a new run")


def patch_sampler(config: TrainConfig) -> PatchSampler:
    """The patch sampler of a training run: its patch size and augmentation."""
    return PatchSampler(config.patch_size, config.tumour_fraction, config.flip, config.rotate_deg, config.scale,
                        config.intensity, config.brain_only_interpolation)


#: Offset of the appearance fit's patch seed from the training seed: other draws than training step n's.
APPEARANCE_SEED_OFFSET = 7919


def fit_export_appearance(generator: nn.Module, config: TrainConfig, sampler: PatchSampler,
                          volumes: list[TrainingVolume], device: torch.device,
                          progress: bool = True) -> "AppearancePrior | None":
    """The trained model's appearance prior: ``config.appearance_patches`` training patches encoded.

    ``None`` for networks without an appearance code, or with ``appearance_patches`` 0. The patches are
    drawn like training's (same sampler and augmentation) from a seed of their own, so the fit repeats exactly.
    """
    from ..synthesis.appearance import fit_appearance_prior

    if not config.network.has_style or config.appearance_patches == 0:
        return None
    net = generator.net  # the unwrapped generator: DDP, where used, wraps this same module
    bar = _bar(config.appearance_patches, 0, progress, desc="appearance prior", unit="patch")
    was_training = net.training
    net.eval()
    try:
        return fit_appearance_prior(lambda images: net.encode(images.to(device)), volumes, sampler,
                                    config.appearance_patches, config.seed + APPEARANCE_SEED_OFFSET, device,
                                    progress=bar.update if bar is not None else None)
    finally:
        net.train(was_training)
        if bar is not None:
            bar.close()


def export_model(model_dir: Path, generator: nn.Module, config: TrainConfig, volumes: list[TrainingVolume],
                 commands: list[str], val_metrics: dict[str, Any], last_losses: dict[str, float], seconds: float,
                 precision: str, device: str, world: int, init_model: dict[str, Any] | None = None,
                 appearance: "AppearancePrior | None" = None) -> Path:
    from ..schema.provenance import software_versions
    from ..synthesis.models import write_model

    state = {k: v.float().cpu() for k, v in state_dict_unwrapped(generator).items()}
    model_config = {
        "name": model_dir.parent.name,
        "network": config.network.to_json(),
        "intensity": _intensity_statistics(volumes),
        "training": {
            "commands": commands,  # the first started the run; later ones resumed it
            "config": config.to_json(),
            "data": data_summary(volumes),
            "steps": config.steps,
            "training_seconds": round(seconds, 1),
            "precision": precision,
            "device": device,
            "world_size": world,
            "final_losses": last_losses,
            # Fine-tuned from this model: its own config.json holds its earlier training.
            "init_from": init_model,
        },
        "validation": val_metrics,
        "software": software_versions(),
    }
    if appearance is not None:
        model_config["appearance"] = appearance.to_json()
    if config.network.kind == "inpainting":
        from ..synthesis.inpainting import BLANK_VALUE, NORMALIZATION

        # Inference normalises each real case against its own grey and white matter, as training did.
        model_config["inpainting"] = {"normalization": NORMALIZATION, "blank_value": BLANK_VALUE,
                                      "margin_range_voxels": list(config.inpaint_margin_range)}
    return write_model(model_dir, state, model_config, overwrite=True)


def validate(generator: nn.Module, network: NetworkConfig, volumes: list[TrainingVolume], device: torch.device,
             precision: str, run_dir: Path, step: int, montage: bool = True,
             detailed: bool = False) -> dict[str, Any]:
    """Synthesise each held-out case from its label map; fidelity metrics and a montage PNG."""
    from ..evaluation.metrics import fidelity
    from ..synthesis.inference import Synthesizer

    if network.kind == "inpainting":
        return validate_inpainting(generator, network, volumes, device, precision, detailed)
    generator.eval()
    synth = Synthesizer(generator, network, device, precision)
    per_case = []
    for volume in _validation_cases(volumes):
        labels = volume.labels
        pred = synth.predict(labels)
        brain = brain_mask(labels)
        regions = {"tumour": tumour_mask(labels)}
        scores = {m: fidelity(volume.images[c].astype(np.float32), pred[c], brain, regions)
                  for c, m in enumerate(network.modalities)}
        per_case.append(scores)
        if montage and volume is volumes[0]:  # one montage per validation: the first held-out case
            from ..schema.grid import Grid
            from ..synthesis.render import render_montage

            grid = Grid(tuple(int(s) for s in labels.shape[::-1]), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0),
                        (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
            vols = {}
            for c, m in enumerate(network.modalities):
                vols[f"real {m}"] = volume.images[c].astype(np.float32) + 1
                vols[f"synthetic {m}"] = pred[c] + 1
            (run_dir / "montages").mkdir(exist_ok=True)
            render_montage(vols, labels, grid, run_dir / "montages" / f"step_{step:07d}.png",
                           title=f"validation, step {step}")
    generator.train()
    return _summarise(per_case, ("brain", "tumour"), network.modalities, volumes, detailed)


def _summarise(per_case: list[dict[str, Any]], regions: tuple[str, ...], modalities: Any,
               volumes: list[TrainingVolume], detailed: bool) -> dict[str, Any]:
    """Mean of each region's SSIM / PSNR / MAE over cases and modalities (``<region>_<metric>``)."""
    summary: dict[str, Any] = {}
    for region in regions:
        for metric in ("ssim", "psnr", "mae"):
            values = [case[m][region][metric] for case in per_case for m in modalities if region in case[m]]
            if values:
                summary[f"{region}_{metric}"] = float(np.mean(values))
    if detailed:
        summary["per_case"] = per_case
        summary["case_sha256"] = [v.key for v in volumes]
    return summary


#: Validation region of an inpainting model: the held-out case's tumour grown by this many voxels (mm at 1 mm).
VALIDATION_MARGIN = 8.0


def validate_inpainting(generator: nn.Module, network: NetworkConfig, volumes: list[TrainingVolume],
                        device: torch.device, precision: str, detailed: bool = False) -> dict[str, Any]:
    """Blank each held-out case's tumour grown by 8 mm, inpaint it from its label map, score inside the region."""
    from ..evaluation.metrics import fidelity
    from ..schema.grid import mask_box
    from ..synthesis.inference import Synthesizer
    from ..synthesis.inpainting import CONTEXT_VOXELS, _ball_growth, inpainting_condition

    generator.eval()
    synth = Synthesizer(generator, network, device, precision)
    per_case = []
    for volume in _validation_cases(volumes):
        labels = volume.labels
        tumour = tumour_mask(labels)
        if not tumour.any():
            continue
        region = _ball_growth(tumour, VALIDATION_MARGIN, (1.0, 1.0, 1.0)) & brain_mask(labels)
        box = mask_box(region, CONTEXT_VOXELS)
        crop = labels[box]
        pads = [(0, (-s) % network.size_multiple) for s in crop.shape]
        lab = torch.from_numpy(np.pad(crop, pads).astype(np.int64))[None]
        img = torch.from_numpy(np.pad(volume.images[(slice(None),) + box].astype(np.float32), [(0, 0)] + pads,
                                      constant_values=-1.0))[None]
        reg = torch.from_numpy(np.pad(region[box], pads))[None, None].float()
        with torch.no_grad():
            out = synth.predict_condition(inpainting_condition(one_hot(lab), img, reg))
        pred = out[0, :, : crop.shape[0], : crop.shape[1], : crop.shape[2]].cpu().numpy()
        inside = region[box]
        # Scored as `medsynth evaluate` scores a tumour: z-scored in the brain, metrics inside the region.
        brain = brain_mask(crop)
        real = volume.images[(slice(None),) + box].astype(np.float32)
        scores = {m: fidelity(real[c], np.where(inside, pred[c], real[c]), brain, {"region": inside})
                  for c, m in enumerate(network.modalities)}
        per_case.append(scores)
    generator.train()
    return _summarise(per_case, ("region",), network.modalities, volumes, detailed)


def _validation_cases(volumes: list[TrainingVolume]):
    """The held-out cases, with a bar per case where the run shows progress (a final validation of nine whole brains
    takes minutes after the training bar reached its end)."""
    if not _VALIDATION_PROGRESS.get():
        return volumes
    from tqdm import tqdm

    # leave=None: cleared when it sits below the open training bar, kept when it stands alone (a resume's)
    return tqdm(volumes, desc="validation", unit="case", file=sys.stderr, dynamic_ncols=True, leave=None)


def _progress_iter(items: list[Any], desc: str, show: bool):
    from tqdm import tqdm

    return tqdm(items, desc=desc, disable=not show or None, file=sys.stderr, leave=False)


def _bar(total: int, start: int, show: bool, desc: str = "train", unit: str = "step"):
    if not show:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
