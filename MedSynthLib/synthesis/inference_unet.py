"""The trained generator's U-Net rebuilt from plain ``torch.nn`` layers, for inference.

Training builds the generator from MONAI's ``UNet`` (:mod:`MedSynthLib.synthesis.networks`).
Importing MONAI costs about two seconds of start-up on a 2-core CPU, more than the
network itself takes to run on a whole brain in bf16, so ``medsynth synthesize``
runs this module instead: the same layers (residual units of
conv + PReLU, stride-2 down-sampling, transposed-conv up-sampling, skip
concatenation), with the same parameter names, so a trained ``state_dict`` loads
with ``strict=True`` and the outputs match MONAI's (tested in
``Testing/test_inference_unet.py`` over a table of architectures).

Only the configuration MedSynth trains is supported: no normalisation layers,
no dropout, PReLU activations, kernel size 3.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn


def _conv(spatial_dims: int, transposed: bool = False) -> type[nn.Module]:
    if transposed:
        return (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[spatial_dims - 1]
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]


def blur_nyquist(x: torch.Tensor) -> torch.Tensor:
    """Separable ``[1, 2, 1] / 4`` filter along every spatial axis of ``(B, C, *spatial)``, edges replicated.

    Its response is 0 at the Nyquist frequency, so it removes the period-2
    checkerboard a stride-2 transposed convolution leaves (Odena et al., Distill
    2016), and it keeps constants and linear ramps unchanged.
    """
    dims, channels = x.ndim - 2, x.shape[1]
    conv = (nn.functional.conv1d, nn.functional.conv2d, nn.functional.conv3d)[dims - 1]
    taps = torch.tensor([0.25, 0.5, 0.25], dtype=x.dtype, device=x.device)
    for axis in range(dims):  # separable: 3 taps per axis instead of 27 at once
        shape = [1] * dims
        shape[axis] = 3
        weight = taps.reshape(1, 1, *shape).expand(channels, 1, *shape)
        pad = [0, 0] * dims
        pad[2 * (dims - 1 - axis)] = pad[2 * (dims - 1 - axis) + 1] = 1  # F.pad lists the last axis first
        x = conv(nn.functional.pad(x, pad, mode="replicate"), weight, groups=channels)
    return x


class _AntiAliased:
    """Mixin for a transposed convolution: its output passes through :func:`blur_nyquist`."""

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        return blur_nyquist(super().forward(x, output_size))  # type: ignore[misc]


class AntiAliasedConvTranspose1d(_AntiAliased, nn.ConvTranspose1d):
    pass


class AntiAliasedConvTranspose2d(_AntiAliased, nn.ConvTranspose2d):
    pass


class AntiAliasedConvTranspose3d(_AntiAliased, nn.ConvTranspose3d):
    pass


_ANTIALIASED: dict[type[nn.Module], type[nn.Module]] = {
    nn.ConvTranspose1d: AntiAliasedConvTranspose1d,
    nn.ConvTranspose2d: AntiAliasedConvTranspose2d,
    nn.ConvTranspose3d: AntiAliasedConvTranspose3d,
}


def antialiased_transposed_conv(conv: nn.Module) -> nn.Module:
    """A copy of a transposed convolution that blurs its output; same parameter names and values.

    Keeping the parameter names lets a model trained without the blur start a
    fine-tune with it (``medsynth train --init``).
    """
    new = _ANTIALIASED[type(conv)](conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                                   padding=conv.padding, output_padding=conv.output_padding, groups=conv.groups,
                                   bias=conv.bias is not None, dilation=conv.dilation)
    new.load_state_dict(conv.state_dict())
    return new.to(conv.weight.device, conv.weight.dtype)


def antialias_upsampling(module: nn.Module) -> int:
    """Replace every strided transposed convolution inside ``module`` by its anti-aliased copy.

    Returns:
        how many were replaced.
    """
    count = 0
    for name, child in list(module.named_children()):
        if type(child) in _ANTIALIASED and max(child.stride) > 1:
            setattr(module, name, antialiased_transposed_conv(child))
            count += 1
        else:
            count += antialias_upsampling(child)
    return count


class _Activation(nn.Module):
    """Holds the PReLU under the name ``A`` (the parameter path MONAI's ADN block uses)."""

    def __init__(self) -> None:
        super().__init__()
        self.A = nn.PReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.A(x)


class _ConvLayer(nn.Module):
    """Convolution (or transposed convolution), then PReLU unless ``conv_only``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int,
                 transposed: bool = False, conv_only: bool = False) -> None:
        super().__init__()
        kwargs = {"output_padding": stride - 1} if transposed else {}
        self.conv = _conv(spatial_dims, transposed)(in_channels, out_channels, 3, stride=stride, padding=1, **kwargs)
        self.adn = None if conv_only else _Activation()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return x if self.adn is None else self.adn(x)


class _ResidualUnit(nn.Module):
    """``subunits`` conv layers (the first one strided) plus a residual path."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int, subunits: int,
                 last_conv_only: bool = False) -> None:
        super().__init__()
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels, unit_stride = in_channels, stride
        for index in range(max(1, subunits)):
            conv_only = last_conv_only and index == max(1, subunits) - 1
            layers[f"unit{index}"] = _ConvLayer(spatial_dims, channels, out_channels, unit_stride, conv_only=conv_only)
            channels, unit_stride = out_channels, 1
        self.conv = nn.Sequential(layers)
        if stride != 1 or in_channels != out_channels:
            kernel = 3 if stride != 1 else 1
            self.residual: nn.Module = _conv(spatial_dims)(in_channels, out_channels, kernel, stride=stride,
                                                           padding=(kernel - 1) // 2)
        else:
            self.residual = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.residual(x)


class _Skip(nn.Module):
    def __init__(self, submodule: nn.Module) -> None:
        super().__init__()
        self.submodule = submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.submodule(x)], dim=1)


class InferenceUNet(nn.Module):
    """U-Net with the layer layout and parameter names of ``monai.networks.nets.UNet``.

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels, out_channels: input and output channels.
        channels: feature channels per level (at least two levels).
        strides: down-sampling stride per level (``len(channels) - 1`` values).
        num_res_units: conv layers per residual unit (0: plain convolutions).
        antialias: blur the output of every strided transposed convolution (:func:`blur_nyquist`).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, channels: Sequence[int],
                 strides: Sequence[int], num_res_units: int = 0, antialias: bool = False) -> None:
        super().__init__()
        if len(channels) < 2 or len(strides) != len(channels) - 1:
            raise ValueError("InferenceUNet needs at least two levels and one stride per down-sampling")
        self.spatial_dims, self.num_res_units = spatial_dims, num_res_units
        self.model = self._block(in_channels, out_channels, list(channels), list(strides), top=True)
        if antialias:
            antialias_upsampling(self.model)

    def _down(self, in_channels: int, out_channels: int, stride: int) -> nn.Module:
        if self.num_res_units > 0:
            return _ResidualUnit(self.spatial_dims, in_channels, out_channels, stride, self.num_res_units)
        return _ConvLayer(self.spatial_dims, in_channels, out_channels, stride)

    def _up(self, in_channels: int, out_channels: int, stride: int, top: bool) -> nn.Module:
        up = _ConvLayer(self.spatial_dims, in_channels, out_channels, stride, transposed=True,
                        conv_only=top and self.num_res_units == 0)
        if self.num_res_units == 0:
            return up
        return nn.Sequential(up, _ResidualUnit(self.spatial_dims, out_channels, out_channels, 1, 1,
                                               last_conv_only=top))

    def _block(self, in_channels: int, out_channels: int, channels: list[int], strides: list[int],
               top: bool) -> nn.Module:
        width = channels[0]
        if len(channels) > 2:
            inner = self._block(width, width, channels[1:], strides[1:], top=False)
            up_channels = 2 * width
        else:
            inner = self._down(width, channels[1], 1)  # the bottom layer keeps the resolution
            up_channels = width + channels[1]
        return nn.Sequential(self._down(in_channels, width, strides[0]), _Skip(inner),
                             self._up(up_channels, out_channels, strides[0], top))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
