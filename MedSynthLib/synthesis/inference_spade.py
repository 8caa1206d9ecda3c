"""The SPADE generator (:mod:`MedSynthLib.synthesis.spade_generator`) rebuilt from plain ``torch.nn`` layers, for inference.

Same layers and parameter names as the training network built from MONAI blocks,
so a trained ``state_dict`` loads with ``strict=True`` and the outputs are equal
(tested in ``Testing/test_spade_generator.py`` over a table of architectures);
``medsynth synthesize`` thereby never imports MONAI.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .inference_unet import _ResidualUnit
from .spade_generator import UPSAMPLE_MODES, label_pyramid, upsample2


def _conv_type(spatial_dims: int) -> type[nn.Module]:
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]


class _Activation(nn.Module):
    """Holds an activation under the name ``A`` (the path of MONAI's ADN block)."""

    def __init__(self, activation: nn.Module) -> None:
        super().__init__()
        self.A = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.A(x)


class _Convolution(nn.Module):
    """Convolution with 'same' padding, then an optional activation (names of MONAI's ``Convolution``)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, activation: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = _conv_type(spatial_dims)(in_channels, out_channels, kernel_size, stride=stride,
                                             padding=(kernel_size - 1) // 2)
        self.adn = None if activation is None else _Activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x if self.adn is None else self.adn(x)


def _leaky() -> nn.Module:
    return nn.LeakyReLU(0.2)


class _SpatialModulation(nn.Module):
    def __init__(self, spatial_dims: int, label_channels: int, channels: int, hidden: int, kernel_size: int) -> None:
        super().__init__()
        self.mlp_shared = _Convolution(spatial_dims, label_channels, hidden, kernel_size, activation=_leaky())
        self.mlp_gamma = _Convolution(spatial_dims, hidden, channels, 1)
        self.mlp_beta = _Convolution(spatial_dims, hidden, channels, 1)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shared = self.mlp_shared(labels)
        return torch.addcmul(x + self.mlp_beta(shared), x, self.mlp_gamma(shared))


class _StyleModulation(nn.Module):
    def __init__(self, style_dim: int, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(style_dim, 2 * channels)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.linear(style).view(style.shape[0], 2, -1, *([1] * (x.dim() - 2))).unbind(1)
        return torch.addcmul(x + beta, x, gamma)


class _DecoderBlock(nn.Module):
    def __init__(self, spatial_dims: int, label_channels: int, in_channels: int, channels: int, hidden: int,
                 kernel_size: int, style_dim: int, upsample: str) -> None:
        super().__init__()
        self.upsample = upsample
        self.up = _Convolution(spatial_dims, in_channels, channels, 3, activation=nn.PReLU())
        self.style = _StyleModulation(style_dim, channels) if style_dim else None
        self.spade = _SpatialModulation(spatial_dims, label_channels, channels, hidden, kernel_size)
        self.act = nn.PReLU()
        self.conv = _Convolution(spatial_dims, channels, channels, 3)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, labels: torch.Tensor,
                style: torch.Tensor | None) -> torch.Tensor:
        x = self.up(x)
        if self.style is not None and style is not None:
            x = self.style(x, style)
        x = upsample2(x, self.upsample) + skip
        return x + self.conv(self.act(self.spade(x, labels)))


class _StyleEncoder(nn.Module):
    def __init__(self, spatial_dims: int, in_channels: int, widths: Sequence[int], style_dim: int) -> None:
        super().__init__()
        layers, previous = [], in_channels
        for width in widths:
            layers.append(_Convolution(spatial_dims, previous, width, 3, stride=2, activation=_leaky()))
            previous = width
        self.features = nn.Sequential(*layers)
        self.mean = nn.Linear(previous, style_dim)
        self.log_variance = nn.Linear(previous, style_dim)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.features(images).flatten(2).mean(2)
        return self.mean(pooled), self.log_variance(pooled).clamp(-10.0, 10.0)


class InferenceSpadeGenerator(nn.Module):
    """Plain-torch twin of :class:`~MedSynthLib.synthesis.spade_generator.SpadeGenerator` (same arguments)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, channels: Sequence[int],
                 bottleneck_blocks: int = 2, spade_hidden: int = 32, style_dim: int = 0,
                 upsample: str = "trilinear") -> None:
        super().__init__()
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
            self.down.append(_Convolution(spatial_dims, previous, width, 3, stride=2, activation=nn.PReLU()))
            previous = width
        self.bottleneck = nn.Sequential(
            _Convolution(spatial_dims, previous, channels[-1], 3, activation=nn.PReLU()),
            *[_ResidualUnit(spatial_dims, channels[-1], channels[-1], 1, 2) for _ in range(bottleneck_blocks)])
        self.blocks = nn.ModuleList()
        previous = channels[-1]
        for level in range(self.levels - 1, 0, -1):
            width = widths[level - 1]
            kernel = 3 if level >= 2 else 1
            self.blocks.append(_DecoderBlock(spatial_dims, in_channels, previous, width, min(spade_hidden, width),
                                             kernel, style_dim, upsample))
            previous = width
        self.head_act = nn.PReLU()
        self.head = _Convolution(spatial_dims, previous, out_channels, 3)
        self.class_offset = _Convolution(spatial_dims, in_channels, out_channels, 1)
        if style_dim:
            self.style_encoder = _StyleEncoder(spatial_dims, out_channels, widths, style_dim)

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
        """Mean and log-variance of the appearance code of real images."""
        return self.style_encoder(images)
