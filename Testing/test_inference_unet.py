"""The MONAI-free inference U-Net loads MONAI UNet weights strictly and computes the same function."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from monai.networks.nets import UNet

from MedSynthLib.synthesis.inference_unet import InferenceUNet, antialias_upsampling, blur_nyquist
from MedSynthLib.synthesis.networks import Generator, NetworkConfig

# (spatial_dims, in, out, channels, strides, num_res_units, input size)
ARCHITECTURES = [
    (3, 7, 4, (16, 32, 64, 128, 256), (2, 2, 2, 2), 1, 32),  # the shipped generator's layout
    (3, 7, 4, (8, 16, 32), (2, 2), 2, 16),
    (3, 7, 4, (8, 16, 32), (2, 2), 0, 16),
    (3, 3, 2, (8, 16), (2,), 1, 12),
    (3, 7, 4, (8, 16, 32), (2, 1), 1, 8),
    (2, 7, 4, (8, 16, 32, 64), (2, 2, 2), 1, 32),
    (2, 1, 1, (4, 8, 16), (2, 2), 3, 16),
]


def _randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    # Default initialisations leave PReLU slopes and biases at constants; vary every parameter.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return module.eval()


@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("dims,cin,cout,channels,strides,res_units,size", ARCHITECTURES)
def test_same_parameters_and_outputs_as_monai(dims, cin, cout, channels, strides, res_units, size, antialias):
    monai_net = _randomised(UNet(dims, cin, cout, channels=channels, strides=strides, num_res_units=res_units,
                                 norm=None), seed=size + res_units)
    if antialias:
        assert antialias_upsampling(monai_net) == sum(s > 1 for s in strides)
    ours = InferenceUNet(dims, cin, cout, channels, strides, res_units, antialias=antialias).eval()
    theirs = monai_net.state_dict()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.items()}
    ours.load_state_dict(theirs, strict=True)
    x = torch.randn((2, cin) + (size,) * dims, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        expected, got = monai_net(x), ours(x)
    assert got.shape == expected.shape == (2, cout) + (size,) * dims
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), float((got - expected).abs().max())


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_blur_removes_the_checkerboard_and_keeps_ramps(dims):
    size = 8
    grids = torch.meshgrid(*[torch.arange(size, dtype=torch.float64)] * dims, indexing="ij")
    checkerboard = (-1.0) ** sum(grids)
    ramp = 0.5 + 2.0 * grids[0] - grids[-1]
    x = torch.stack([checkerboard, ramp, torch.full_like(ramp, 3.0)])[None]
    out = blur_nyquist(x)
    assert out.shape == x.shape
    interior = (slice(None), slice(None)) + (slice(1, -1),) * dims
    assert out[interior][0, 0].abs().max() < 1e-12
    assert torch.allclose(out[interior][0, 1], x[interior][0, 1], atol=1e-12)
    assert torch.allclose(out[0, 2], x[0, 2])  # constants everywhere, edges included


def test_antialiasing_keeps_the_parameter_names_and_changes_the_output():
    """A model trained without the blur loads into one with it (a fine-tune can switch it on)."""
    plain = _randomised(Generator(NetworkConfig(channels=(8, 16, 32), strides=(2, 2)), backend="monai"), seed=5)
    for backend in ("monai", "torch"):
        blurred = Generator(NetworkConfig(channels=(8, 16, 32), strides=(2, 2), antialias=True), backend=backend)
        blurred.load_state_dict(plain.state_dict(), strict=True)
        x = torch.nn.functional.one_hot(torch.randint(0, 7, (1, 16, 16, 16)), 7).movedim(-1, 1).float()
        with torch.inference_mode():
            a, b = plain(x), blurred.eval()(x)
        assert a.shape == b.shape and not torch.allclose(a, b)
        names = {type(m).__name__ for m in blurred.modules()}
        assert "AntiAliasedConvTranspose3d" in names and "ConvTranspose3d" not in names


def test_generator_backends_agree_in_bf16():
    config = NetworkConfig(channels=(8, 16, 32), strides=(2, 2))
    monai_gen = _randomised(Generator(config, backend="monai"), seed=3)
    torch_gen = Generator(config, backend="torch").eval()
    torch_gen.load_state_dict(monai_gen.state_dict(), strict=True)
    x = torch.nn.functional.one_hot(torch.randint(0, 7, (1, 24, 24, 24)), 7).movedim(-1, 1).float()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = monai_gen(x).float(), torch_gen(x).float()
    assert torch.equal(a, b)


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        Generator(NetworkConfig(), backend="onnx")


def test_inference_path_does_not_import_monai():
    # The start-up time of `medsynth synthesize` depends on it: load the shipped model, synthesise.
    code = "\n".join([
        "import sys, numpy as np",
        "import MedSynthLib.cli",
        "from MedSynthLib.schema.grid import Grid, LabelMap",
        "from MedSynthLib.synthesis.models import resolve_model",
        "from MedSynthLib.synthesis.synthesize import SynthesisEngine",
        "labels = np.zeros((40, 40, 40), np.uint8)",
        "labels[8:32, 8:32, 8:32] = 3",
        "grid = Grid((40, 40, 40), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))",
        "SynthesisEngine(resolve_model(), 'cpu').synthesize(LabelMap(labels, grid))",
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'monai'))",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
