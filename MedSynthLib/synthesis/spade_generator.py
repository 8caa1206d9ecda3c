"""A label -> image generator with the label map injected at every decoder scale (``network.kind: spade``).

After SPADE (Park et al., *Semantic image synthesis with spatially-adaptive
normalization*, CVPR 2019) and its use for brain MRI, brainSPADE (Fernandez et
al., SASHIMI 2022): every decoder scale modulates its features per voxel with
a scale and shift computed from the label map at that resolution, so the
classes cannot be washed out on the way up.  What MedSynth changes, and why:

* **No statistics-based normalisation** before the modulation.  The network is
  trained on patches and run on whole brain boxes; instance or batch statistics
  of a patch differ from those of a volume, which would change the image with the
  window size (the reason the U-Net has none either).  The modulation alone
  carries the label map.  For the same reason MONAI's ``SPADE`` block is not
  used: in MONAI 1.6 its ``mlp_gamma`` / ``mlp_beta`` convolutions instance-
  normalise the scale and shift maps themselves (the ``Convolution`` default).
* **Up-sampling by interpolation, then convolution** (Odena et al., Distill
  2016): the convolution runs at the coarse scale and its output is enlarged by
  linear interpolation (``upsample: trilinear``, whose kernel is zero at the
  Nyquist frequency, so no period-2 checkerboard) or nearest-neighbour copy.
  Running the convolution before enlarging keeps the cost of the fine scales low
  enough for the CPU speed bar.
* **Label fractions, not nearest samples**: each scale's label map is the
  average-pooled one-hot map, so a thin sulcus keeps a fraction instead of
  vanishing at coarse scales.
* **An appearance code** (``style_dim > 0``): a low-dimensional latent drawn from
  a standard normal by ``--seed`` at synthesis adds a per-channel scale and shift
  at every scale (as AdaIN does in StyleGAN, Karras et al. CVPR 2019).  During
  training it is encoded from the real images by a small encoder and pulled
  towards the standard normal with a KL term (SPADE's VAE variant), so drawing
  it from the prior gives appearances like the training cases'.
* **Context**: four down-samplings and residual blocks at 1/16 resolution give a
  receptive field of 303 voxels per axis with the proposed widths (the shipped U-Net: 95), more
  than a whole brain box.

The layers are MONAI blocks (``Convolution``, ``ResidualUnit``); inference runs
the same network rebuilt from plain torch layers with the same parameter names
(:mod:`MedSynthLib.synthesis.inference_spade`), tested equal.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

UPSAMPLE_MODES = ("trilinear", "nearest")


def label_pyramid(onehot: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """The one-hot map and its 2x average-pooled versions (class fractions), finest first.

    The pooling is a stride-2 convolution with fixed weights (identity / 2**dims): the same
    numbers as average pooling, but it runs in bf16 and the channels-last layout, where CPU
    average pooling has no bf16 kernel and costs a float copy of the full-resolution map.
    """
    dims, classes = onehot.dim() - 2, onehot.shape[1]
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    dtype = torch.get_autocast_dtype(onehot.device.type) if torch.is_autocast_enabled(onehot.device.type) \
        else onehot.dtype
    weight = torch.eye(classes, dtype=dtype, device=onehot.device).view(classes, classes, *([1] * dims))
    weight = (weight / 2 ** dims).expand(classes, classes, *([2] * dims))
    maps = [onehot]
    for _ in range(levels):
        maps.append(conv(maps[-1].to(dtype), weight, stride=2))
    return maps


def upsample2(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Double every spatial size: linear interpolation (per the data's dimension) or nearest copy."""
    if mode == "nearest":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    linear = ("linear", "bilinear", "trilinear")[x.dim() - 3]
    return F.interpolate(x, scale_factor=2, mode=linear, align_corners=False)


def kl_to_standard_normal(mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_variance)) || N(0, I)), summed over the code, averaged over the batch."""
    return 0.5 * (mean.pow(2) + log_variance.exp() - 1.0 - log_variance).sum(1).mean()


class SpatialModulation(nn.Module):
    """``x * (1 + gamma(labels)) + beta(labels)`` (SPADE without the parameter-free normalisation).

    Args:
        spatial_dims: 1, 2 or 3.
        label_channels: one-hot classes.
        channels: feature channels modulated.
        hidden: channels of the shared hidden layer.
        kernel_size: of the shared layer, which sees the label neighbourhood: 3 at coarse scales, 1 at
            fine ones, where the modulation becomes a per-class lookup and stays cheap on big maps.
            ``gamma`` and ``beta`` are 1x1 convolutions of the shared layer.
    """

    def __init__(self, spatial_dims: int, label_channels: int, channels: int, hidden: int, kernel_size: int) -> None:
        super().__init__()
        from monai.networks.blocks import Convolution

        self.mlp_shared = Convolution(spatial_dims, label_channels, hidden, kernel_size=kernel_size,
                                      act=("leakyrelu", {"negative_slope": 0.2}), norm=None)
        self.mlp_gamma = Convolution(spatial_dims, hidden, channels, kernel_size=1, conv_only=True)
        self.mlp_beta = Convolution(spatial_dims, hidden, channels, kernel_size=1, conv_only=True)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shared = self.mlp_shared(labels)
        return torch.addcmul(x + self.mlp_beta(shared), x, self.mlp_gamma(shared))


class StyleModulation(nn.Module):
    """Per-channel ``x * (1 + gamma(z)) + beta(z)`` from the appearance code ``z``."""

    def __init__(self, style_dim: int, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(style_dim, 2 * channels)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.linear(style).view(style.shape[0], 2, -1, *([1] * (x.dim() - 2))).unbind(1)
        return torch.addcmul(x + beta, x, gamma)


class SpadeDecoderBlock(nn.Module):
    """One decoder step, coarse to fine.

    Convolution at the coarse scale, the appearance code's per-channel modulation
    (there, 8x cheaper: a per-channel affine map commutes with the interpolation),
    interpolation to the finer scale, the encoder's skip added, then label
    modulation, activation and a convolution, added back (residual).
    """

    def __init__(self, spatial_dims: int, label_channels: int, in_channels: int, channels: int, hidden: int,
                 kernel_size: int, style_dim: int, upsample: str) -> None:
        super().__init__()
        from monai.networks.blocks import Convolution

        self.upsample = upsample
        self.up = Convolution(spatial_dims, in_channels, channels, kernel_size=3, act="PRELU", norm=None)
        self.style = StyleModulation(style_dim, channels) if style_dim else None
        self.spade = SpatialModulation(spatial_dims, label_channels, channels, hidden, kernel_size)
        self.act = nn.PReLU()
        self.conv = Convolution(spatial_dims, channels, channels, kernel_size=3, conv_only=True)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, labels: torch.Tensor,
                style: torch.Tensor | None) -> torch.Tensor:
        x = self.up(x)
        if self.style is not None and style is not None:
            x = self.style(x, style)
        x = upsample2(x, self.upsample) + skip
        return x + self.conv(self.act(self.spade(x, labels)))


class SpadeGenerator(nn.Module):
    """Label map -> images, label map injected at every decoder scale; MONAI blocks (training).

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: one-hot label classes.
        out_channels: output images (no final activation; :class:`~MedSynthLib.synthesis.networks.Generator` adds tanh).
        channels: widths at 1/2, 1/4, ... of the input resolution; the last is the width of the
            residual blocks at the coarsest scale (as MONAI's UNet, ``len(channels) - 1`` down-samplings).
        bottleneck_blocks: residual units (two convolutions each) at the coarsest scale: the context.
        spade_hidden: hidden channels of the label modulation (capped at each scale's width).
        style_dim: length of the appearance code (0: none; the output is then fully determined by the labels).
        upsample: ``trilinear`` (linear per the data's dimension) or ``nearest``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, channels: Sequence[int],
                 bottleneck_blocks: int = 2, spade_hidden: int = 32, style_dim: int = 0,
                 upsample: str = "trilinear") -> None:
        super().__init__()
        from monai.networks.blocks import Convolution, ResidualUnit

        if len(channels) < 2:
            raise ValueError("the SPADE generator needs at least two widths (one down-sampling)")
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, not {upsample!r}")
        self.levels = len(channels) - 1
        self.upsample, self.style_dim = upsample, style_dim
        widths = list(channels[:-1])
        self.down = nn.ModuleList()
        previous = in_channels
        for width in widths:
            self.down.append(Convolution(spatial_dims, previous, width, strides=2, kernel_size=3, act="PRELU",
                                         norm=None))
            previous = width
        self.bottleneck = nn.Sequential(
            Convolution(spatial_dims, previous, channels[-1], kernel_size=3, act="PRELU", norm=None),
            *[ResidualUnit(spatial_dims, channels[-1], channels[-1], strides=1, subunits=2, act="PRELU", norm=None)
              for _ in range(bottleneck_blocks)])
        # Decoder, coarsest first, down to 1/2 of the input resolution.
        self.blocks = nn.ModuleList()
        previous = channels[-1]
        for level in range(self.levels - 1, 0, -1):  # the block's output is at 1 / 2**level
            width = widths[level - 1]
            kernel = 3 if level >= 2 else 1
            self.blocks.append(SpadeDecoderBlock(spatial_dims, in_channels, previous, width, min(spade_hidden, width),
                                                 kernel, style_dim, upsample))
            previous = width
        # The images are made at 1/2 scale, plus a per-class offset from the label fractions there (a 1x1
        # convolution: sharp class contrast), and interpolated to full resolution.  An offset painted voxel
        # by voxel at full resolution carried 5x the real image's period-2 power on BraTS2021_00006 (the
        # derived label maps are speckled); blurring it cost more than the network's full-resolution work.
        self.head_act = nn.PReLU()
        self.head = Convolution(spatial_dims, previous, out_channels, kernel_size=3, conv_only=True)
        self.class_offset = Convolution(spatial_dims, in_channels, out_channels, kernel_size=1, conv_only=True)
        if style_dim:
            self.style_encoder = StyleEncoder(spatial_dims, out_channels, widths, style_dim)

    def forward(self, onehot: torch.Tensor, style: torch.Tensor | None = None) -> torch.Tensor:
        labels = label_pyramid(onehot, self.levels)
        skips = []
        x = onehot
        for down in self.down:
            x = down(x)
            skips.append(x)
        x = self.bottleneck(x)
        for index, block in enumerate(self.blocks):
            level = self.levels - 1 - index
            x = block(x, skips[level - 1], labels[level], style)
        return upsample2(self.head(self.head_act(x)) + self.class_offset(labels[1]), self.upsample)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of the appearance code of real images (training)."""
        return self.style_encoder(images)


class StyleEncoder(nn.Module):
    """Real images -> (mean, log-variance) of the appearance code: strided convolutions, global average."""

    def __init__(self, spatial_dims: int, in_channels: int, widths: Sequence[int], style_dim: int) -> None:
        super().__init__()
        from monai.networks.blocks import Convolution

        layers = []
        previous = in_channels
        for width in widths:
            layers.append(Convolution(spatial_dims, previous, width, strides=2, kernel_size=3,
                                      act=("leakyrelu", {"negative_slope": 0.2}), norm=None))
            previous = width
        self.features = nn.Sequential(*layers)
        self.mean = nn.Linear(previous, style_dim)
        self.log_variance = nn.Linear(previous, style_dim)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.features(images).flatten(2).mean(2)
        return self.mean(pooled), self.log_variance(pooled).clamp(-10.0, 10.0)
