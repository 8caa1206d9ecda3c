"""The SPADE generator (network kind ``spade``): MONAI and plain-torch builds agree, the label map and the
appearance code reach the output, up-sampling leaves no checkerboard, and inference stays MONAI-free."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from MedSynthLib.synthesis.inference_spade import InferenceSpadeGenerator
from MedSynthLib.synthesis.networks import Generator, NetworkConfig, one_hot, style_code
from MedSynthLib.synthesis.spade_generator import SpadeGenerator, label_pyramid

# (spatial_dims, in, out, channels, bottleneck_blocks, spade_hidden, style_dim, upsample, input size)
ARCHITECTURES = [
    (3, 7, 4, (16, 32, 64, 128, 128), 2, 32, 8, "trilinear", 32),  # the proposed retraining layout
    (3, 7, 4, (8, 16, 32), 1, 8, 0, "trilinear", 16),
    (3, 7, 4, (8, 16, 32), 0, 4, 3, "nearest", 16),
    (3, 3, 2, (4, 8), 1, 8, 2, "trilinear", 8),
    (2, 7, 4, (8, 16, 32, 64), 2, 16, 4, "trilinear", 32),
    (2, 7, 4, (8, 16, 16), 1, 8, 0, "nearest", 16),
    (1, 5, 2, (4, 8, 16), 1, 4, 2, "trilinear", 16),
]


def _randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    # Default initialisations leave PReLU slopes and biases at constants; vary every parameter.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return module.eval()


def _labels(dims: int, classes: int, size: int, seed: int = 0) -> torch.Tensor:
    labels = torch.randint(0, classes, (2,) + (size,) * dims, generator=torch.Generator().manual_seed(seed))
    return one_hot(labels, classes)


@pytest.mark.parametrize("dims,cin,cout,channels,blocks,hidden,style_dim,upsample,size", ARCHITECTURES)
def test_same_parameters_and_outputs_as_the_monai_build(dims, cin, cout, channels, blocks, hidden, style_dim,
                                                        upsample, size):
    monai_net = _randomised(SpadeGenerator(dims, cin, cout, channels, blocks, hidden, style_dim, upsample),
                            seed=size + blocks)
    ours = InferenceSpadeGenerator(dims, cin, cout, channels, blocks, hidden, style_dim, upsample).eval()
    theirs = monai_net.state_dict()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.items()}
    ours.load_state_dict(theirs, strict=True)
    x = _labels(dims, cin, size)
    style = torch.randn((2, style_dim), generator=torch.Generator().manual_seed(3)) if style_dim else None
    with torch.inference_mode():
        expected, got = monai_net(x, style), ours(x, style)
        if style_dim:
            reference = torch.randn((2, cout) + (size,) * dims, generator=torch.Generator().manual_seed(4))
            for a, b in zip(monai_net.encode(reference), ours.encode(reference)):
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert got.shape == expected.shape == (2, cout) + (size,) * dims
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5), float((got - expected).abs().max())


def test_generator_backends_agree_in_bf16_channels_last():
    config = NetworkConfig(kind="spade", channels=(8, 16, 32), strides=(2, 2), style_dim=4, spade_hidden=8)
    monai_gen = _randomised(Generator(config, backend="monai"), seed=3)
    torch_gen = Generator(config, backend="torch").eval()
    torch_gen.load_state_dict(monai_gen.state_dict(), strict=True)
    x = _labels(3, 7, 24)[:1].contiguous(memory_format=torch.channels_last_3d)
    style = style_code(5, 4)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = monai_gen(x, style).float(), torch_gen(x, style).float()
    assert torch.equal(a, b)


def test_label_pyramid_is_average_pooling():
    x = _labels(3, 7, 16)
    pyramid = label_pyramid(x, 3)
    for level, pooled in enumerate(pyramid):
        expected = torch.nn.functional.avg_pool3d(x, 2 ** level) if level else x
        assert torch.allclose(pooled, expected, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert label_pyramid(x, 1)[1].dtype == torch.bfloat16


def test_every_decoder_scale_sees_the_label_map():
    """Changing one label voxel changes the output there even with every skip connection zeroed."""
    net = _randomised(SpadeGenerator(3, 7, 4, (8, 16, 32), 1, 8), seed=1)
    with torch.no_grad():
        for down in net.down:
            down.conv.weight.zero_()
            down.conv.bias.zero_()
    x = _labels(3, 7, 16)[:1]
    y = x.clone()
    y[0, :, 8, 8, 8] = 0
    y[0, 2, 8, 8, 8] = 1 if x[0, 2, 8, 8, 8] == 0 else 0
    y[0, 3, 8, 8, 8] = 1 - y[0, 2, 8, 8, 8]
    with torch.inference_mode():
        difference = (net(x) - net(y)).abs().sum(1)[0]
    assert difference[8, 8, 8] > 0
    # ... and beyond its own 2x2x2 cell: modulation at coarser scales spreads it.
    assert difference[10, 10, 10] > 0


def test_upsampling_leaves_no_checkerboard():
    """Linear up-sampling leaves no period-2 pattern; nearest-neighbour copies (same weights) leave one."""
    import numpy as np

    from MedSynthLib.evaluation.image_checks import nyquist_power

    smooth = _randomised(SpadeGenerator(3, 7, 4, (8, 16, 32), 1, 8, upsample="trilinear"), seed=2)
    blocky = SpadeGenerator(3, 7, 4, (8, 16, 32), 1, 8, upsample="nearest").eval()
    blocky.load_state_dict(smooth.state_dict())
    x = torch.zeros(1, 7, 48, 48, 48)
    x[:, 2] = torch.linspace(0, 1, 48)[:, None, None]  # a smooth mixture of two classes
    x[:, 3] = 1 - x[:, 2]
    mask = np.zeros((48, 48, 48), bool)
    mask[2:-2, 2:-2, 2:-2] = True
    with torch.inference_mode():
        smooth_out, blocky_out = smooth(x)[0].numpy(), blocky(x)[0].numpy()
    for channel in range(4):
        assert nyquist_power(smooth_out[channel], mask) < 0.1 * nyquist_power(blocky_out[channel], mask)


def test_style_code_changes_the_output_and_is_reproducible():
    config = NetworkConfig(kind="spade", channels=(8, 16, 32), strides=(2, 2), style_dim=4, spade_hidden=8)
    net = _randomised(Generator(config, backend="torch"), seed=4)
    x = _labels(3, 7, 16)[:1]
    assert torch.equal(style_code(11, 4), style_code(11, 4))
    codes = [style_code(seed, 4) for seed in (0, 1, -1, 2 ** 32, 2 ** 64 + 1)]  # all distinct
    assert all(not torch.equal(a, b) for i, a in enumerate(codes) for b in codes[i + 1:])
    assert style_code(3, 4).dtype == torch.float32 and style_code(3, 4, batch=2).shape == (2, 4)
    with torch.inference_mode():
        a, b, a_again = net(x, style_code(1, 4)), net(x, style_code(2, 4)), net(x, style_code(1, 4))
        default = net(x)
    assert torch.equal(a, a_again)
    assert not torch.allclose(a, b)
    assert torch.equal(default, net(x, torch.zeros(1, 4)))


def test_training_forward_returns_the_code_kl():
    config = NetworkConfig(kind="spade", channels=(8, 16, 32), strides=(2, 2), style_dim=4, spade_hidden=8)
    net = Generator(config, backend="monai")
    x = _labels(3, 7, 16)
    real = torch.rand(2, 4, 16, 16, 16) * 2 - 1
    fake, kl = net(x, reference=real, noise=torch.randn(2, 4))
    assert fake.shape == real.shape and kl.ndim == 0 and float(kl.detach()) >= 0
    (fake.abs().mean() + kl).backward()
    assert net.net.style_encoder.mean.weight.grad is not None


@pytest.mark.parametrize("network,message", [
    ({"kind": "gan"}, "kind"),
    ({"kind": "spade", "channels": [8, 16, 32], "strides": [2, 1]}, "strides"),
    ({"kind": "spade", "channels": [8, 16, 32], "strides": [2, 2], "upsample": "cubic"}, "upsample"),
])
def test_bad_network_configs_are_refused(network, message):
    with pytest.raises(ValueError, match=message):
        Generator(NetworkConfig.from_json(network), backend="torch")


def test_old_unet_configs_still_mean_unet():
    config = NetworkConfig.from_json({"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1})
    assert config.kind == "unet" and not config.has_style
    assert "unet.model.0.conv.unit0.conv.weight" in Generator(config, backend="torch").state_dict()


def test_spade_inference_does_not_import_monai():
    code = "\n".join([
        "import sys, torch",
        "from MedSynthLib.synthesis.networks import Generator, NetworkConfig, one_hot",
        "config = NetworkConfig(kind='spade', channels=(8, 16, 32), strides=(2, 2), style_dim=4)",
        "net = Generator(config, backend='torch').eval()",
        "net(one_hot(torch.zeros(1, 16, 16, 16, dtype=torch.long)))",
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'monai'))",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
