"""The conditional GAN of Shin et al. 2018 (pix2pix, Isola et al. CVPR 2017) in 3D.

Generator: a MONAI U-Net (``network.kind: unet``) or the SPADE generator of
:mod:`MedSynthLib.synthesis.spade_generator` (``kind: spade``) from the one-hot 7-class
label map to four MR contrasts (T1, T1ce, T2, FLAIR) in ``[-1, 1]``.
Discriminator: MONAI's PatchGAN on the (label map, image) pair.  All are
``spatial_dims``-generic.

The generator has no normalisation layers: it is trained on patches and run on
whole brains, and instance/batch statistics of a patch differ from those of a
volume, which would change the output with the window size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..schema.labels import MODALITIES, NUM_CLASSES

MODALITY_ORDER: tuple[str, ...] = MODALITIES
NETWORK_KINDS = ("unet", "spade", "inpainting")
#: An inpainting network (``kind: inpainting``) sees the one-hot label map, the four real contrasts with
#: the region blanked, and the region mask: NUM_CLASSES + 4 + 1 input channels.
INPAINTING_IN_CHANNELS = NUM_CLASSES + len(MODALITY_ORDER) + 1


@dataclass
class NetworkConfig:
    """Architecture of the generator and discriminator (stored in every model's config.json)."""

    spatial_dims: int = 3
    in_channels: int = NUM_CLASSES
    out_channels: int = len(MODALITY_ORDER)
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 1
    disc_channels: int = 32
    disc_layers: int = 3
    # Blur after each stride-2 transposed convolution: no checkerboard.  Not a parameter, so a
    # model trained without it can start a fine-tune with it.
    antialias: bool = False
    modalities: tuple[str, ...] = field(default_factory=lambda: MODALITY_ORDER)
    # "unet" (MONAI UNet, the original pix2pix generator) or "spade" (MedSynthLib.synthesis.spade_generator: the
    # label map injected at every decoder scale, interpolation up-sampling, optional appearance code).
    # The fields below apply to "spade" (and "inpainting": the SPADE generator on the label map + the real
    # contrasts with a region blanked + the region mask, MedSynthLib.synthesis.inpainting).
    kind: str = "unet"
    bottleneck_blocks: int = 2
    spade_hidden: int = 32
    style_dim: int = 0
    upsample: str = "trilinear"

    def __post_init__(self) -> None:
        if self.kind not in NETWORK_KINDS:
            raise ValueError(f"network kind must be one of {list(NETWORK_KINDS)}, not {self.kind!r}")
        if self.kind in ("spade", "inpainting") and (any(s != 2 for s in self.strides) or len(self.strides) != len(self.channels) - 1):
            raise ValueError("a spade network down-samples by 2 per level: strides must be 2, one per width but "
                             "the last")

    @property
    def has_style(self) -> bool:
        """Whether the network takes an appearance code, i.e. whether the synthesis seed changes the image."""
        return self.kind == "spade" and self.style_dim > 0

    @property
    def size_multiple(self) -> int:
        """Input sizes must be multiples of this (the product of the strides)."""
        multiple = 1
        for stride in self.strides:
            multiple *= stride
        return multiple

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "NetworkConfig":
        known = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()
                 if k in cls.__dataclass_fields__}
        return cls(**known)


class Generator(nn.Module):
    """Label map -> images (U-Net or SPADE generator, ``network.kind``), ``tanh`` output in ``[-1, 1]``.

    Args:
        config: the architecture.
        backend: ``"monai"`` builds the network from MONAI (training); ``"torch"`` builds
            the same network from plain torch layers with the same parameter names
            (:mod:`~MedSynthLib.synthesis.inference_unet`, :mod:`~MedSynthLib.synthesis.inference_spade`),
            which spares inference the MONAI import.
    """

    def __init__(self, config: NetworkConfig, backend: str = "monai") -> None:
        super().__init__()
        self.config = config
        if backend not in ("monai", "torch"):
            raise ValueError(f"unknown generator backend {backend!r} (monai or torch)")
        if config.kind in ("spade", "inpainting"):
            if backend == "torch":
                from .inference_spade import InferenceSpadeGenerator as Spade
            else:
                from .spade_generator import SpadeGenerator as Spade  # type: ignore[assignment]
            self.net: nn.Module = Spade(config.spatial_dims, config.in_channels, config.out_channels, config.channels,
                                        bottleneck_blocks=config.bottleneck_blocks, spade_hidden=config.spade_hidden,
                                        style_dim=config.style_dim, upsample=config.upsample)
        elif backend == "torch":
            from .inference_unet import InferenceUNet

            self.unet: nn.Module = InferenceUNet(config.spatial_dims, config.in_channels, config.out_channels,
                                                 config.channels, config.strides, config.num_res_units,
                                                 antialias=config.antialias)
        else:
            from monai.networks.nets import UNet

            self.unet = UNet(config.spatial_dims, config.in_channels, config.out_channels, channels=config.channels,
                             strides=config.strides, num_res_units=config.num_res_units, norm=None)
            if config.antialias:
                from .inference_unet import antialias_upsampling

                antialias_upsampling(self.unet)

    def forward(self, onehot: torch.Tensor, style: torch.Tensor | None = None, reference: torch.Tensor | None = None,
                noise: torch.Tensor | None = None,
                extra_styles: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Images in ``[-1, 1]``.

        Args:
            onehot: (B, C, *spatial) one-hot label map.
            style: (B, style_dim) appearance code (networks with one; default: zeros, the prior's mean).
            reference: training only: real images whose encoded code is used instead of ``style``;
                the output is then ``(images, KL of the code to the standard normal)``.
            noise: (B, style_dim) standard-normal draws for the code's reparameterisation (with ``reference``).
            extra_styles: (B, style_dim) training only, with ``reference``: further codes rendered on the same label
                maps in the same forward pass (one pass, as DistributedDataParallel needs), their images after the
                encoded codes' along the batch (2B images).
        """
        if self.config.kind == "unet":
            return torch.tanh(self.unet(onehot))
        if self.config.kind == "inpainting":  # onehot: the whole condition (labels, blanked images, mask)
            return torch.tanh(self.net(onehot, None))
        if reference is not None and self.config.has_style:
            from .spade_generator import kl_to_standard_normal

            mean, log_variance = self.net.encode(reference)
            if noise is None:
                noise = torch.zeros_like(mean)
            style = mean + noise.to(mean) * torch.exp(0.5 * log_variance)
            if extra_styles is not None:
                onehot, style = torch.cat([onehot, onehot], 0), torch.cat([style, extra_styles.to(style)], 0)
            return torch.tanh(self.net(onehot, style)), kl_to_standard_normal(mean.float(), log_variance.float())
        if self.config.has_style and style is None:
            style = onehot.new_zeros((onehot.shape[0], self.config.style_dim))
        return torch.tanh(self.net(onehot, style if self.config.has_style else None))


def style_code(seed: int, style_dim: int, batch: int = 1) -> torch.Tensor:
    """The appearance code ``seed`` stands for: standard-normal draws seeded with it (float32, CPU).

    numpy's PCG64 seeded through a ``SeedSequence`` takes any integer whole (torch's CPU generator
    keeps only 32 bits of a seed, so seeds 0 and 2**32 would draw the same code), and gives the
    same numbers on every platform.
    """
    import numpy as np

    rng = np.random.default_rng([abs(int(seed)), int(seed < 0)])
    return torch.from_numpy(rng.standard_normal((batch, style_dim)).astype(np.float32))


def build_discriminator(config: NetworkConfig) -> nn.Module:
    """PatchGAN on the concatenated (one-hot labels, images)."""
    from monai.networks.nets import PatchDiscriminator

    return PatchDiscriminator(spatial_dims=config.spatial_dims, num_layers_d=config.disc_layers,
                              channels=config.disc_channels, in_channels=config.in_channels + config.out_channels,
                              out_channels=1, norm="INSTANCE")


class _Checkpointed(nn.Module):
    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self.module, x, use_reentrant=False)
        return self.module(x)


def enable_gradient_checkpointing(module: nn.Module) -> int:
    """Recompute every residual unit in the backward pass instead of storing activations.

    Returns the number of wrapped units. Weight names change (``.module.``), so
    checkpoints are always saved from an unwrapped copy; see :func:`state_dict_unwrapped`.
    """
    from monai.networks.blocks import ResidualUnit

    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, ResidualUnit):
            setattr(module, name, _Checkpointed(child))
            count += 1
        else:
            count += enable_gradient_checkpointing(child)
    return count


def state_dict_unwrapped(module: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with checkpoint and DDP wrappers removed from the names."""
    module = getattr(module, "module", module) if isinstance(module, nn.parallel.DistributedDataParallel) else module
    return {k.replace(".module.", "."): v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def one_hot(labels: torch.Tensor, num_classes: int = NUM_CLASSES, dtype: torch.dtype = torch.float32,
            channels_last: bool = False) -> torch.Tensor:
    """(B, *spatial) integer labels -> (B, C, *spatial) one-hot.

    Args:
        labels: integer label tensor.
        num_classes: C.
        dtype: element type (bf16 inputs spare autocast a copy at inference).
        channels_last: build it in the channels-last layout the inference convolutions use
            (same values and shape, only the memory order differs); else contiguous.
    """
    # A comparison per class: no int64 copy of the labels.
    if channels_last:
        classes = torch.arange(num_classes, device=labels.device)
        return (labels.unsqueeze(-1) == classes).to(dtype).movedim(-1, 1)
    classes = torch.arange(num_classes, device=labels.device).view((1, num_classes) + (1,) * (labels.dim() - 1))
    return (labels.unsqueeze(1) == classes).to(dtype)
