"""``medsynth synthesize --seed``: a model with an appearance code gives another image per seed and the same
image for the same seed; a model without one says in its provenance that the seed has no effect."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from MedSynthLib.cli import main
from MedSynthLib.schema.labelmap import write_label_map
from MedSynthLib.synthesis.models import resolve_model, write_model
from MedSynthLib.synthesis.networks import MODALITY_ORDER, Generator, NetworkConfig
from MedSynthLib.synthesis.synthesize import OUTPUT_NAMES, SynthesisEngine

from MedSynthLib.schema.grid import Grid, LabelMap
from MedSynthLib.schema.labels import Label

INTENSITY = {m: {"low": 0.0, "high": 1000.0} for m in MODALITY_ORDER}
STYLED = NetworkConfig(kind="spade", channels=(4, 8, 8), strides=(2, 2), spade_hidden=4, style_dim=4,
                       bottleneck_blocks=1, disc_channels=4, disc_layers=2)
PLAIN = NetworkConfig(channels=(4, 8), strides=(2,), num_res_units=1, disc_channels=4, disc_layers=2)


def synthetic_brain(size: tuple[int, int, int] = (36, 40, 32)) -> LabelMap:
    """Ellipsoid brain: WM core, GM shell, CSF rim, a tumour with all three classes."""
    grid = Grid(size[::-1], (1.0, 1.2, 1.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    k, j, i = np.indices(size, dtype=float)
    centre = (np.array(size) - 1) / 2
    r = np.sqrt(sum(((g - c) / (0.42 * n)) ** 2 for g, c, n in zip((k, j, i), centre, size)))
    labels = np.zeros(size, np.uint8)
    labels[r < 1.0] = Label.CSF
    labels[r < 0.9] = Label.GM
    labels[r < 0.7] = Label.WM
    d = np.sqrt((k - 0.6 * size[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2)
    for value, radius in ((Label.ED, 7.0), (Label.ET, 5.0), (Label.NCR, 3.0)):
        labels[(d < radius) & (labels > 0)] = value
    return LabelMap(labels, grid)


def _model(folder: Path, network: NetworkConfig) -> Path:
    torch.manual_seed(11)
    generator = Generator(network, backend="torch")
    with torch.no_grad():  # default initialisation leaves the style layers' effect tiny: make it visible
        for parameter in generator.parameters():
            parameter.copy_(torch.randn(parameter.shape) * 0.1)
    state = {k: v.detach().contiguous() for k, v in generator.state_dict().items()}
    return write_model(folder, state, {"name": folder.name, "network": network.to_json(), "intensity": INTENSITY})


@pytest.fixture(scope="module")
def styled_model(tmp_path_factory) -> Path:
    return _model(tmp_path_factory.mktemp("models") / "styled", STYLED)


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory) -> Path:
    return _model(tmp_path_factory.mktemp("models") / "plain", PLAIN)


@pytest.fixture(scope="module")
def labels_file(tmp_path_factory) -> Path:
    return write_label_map(synthetic_brain(), tmp_path_factory.mktemp("labels") / "labels.nii.gz")


def _synthesize(labels: Path, model: Path, out: Path, seed: int, *extra: str) -> tuple[dict[str, np.ndarray], dict]:
    argv = ["synthesize", str(labels), "-o", str(out), "--model", str(model), "--device", "cpu",
            "--precision", "fp32", "--seed", str(seed), *extra]
    assert main(argv) == 0
    images = {m: sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{m}.nii.gz"))) for m in OUTPUT_NAMES}
    return images, json.loads((out / "provenance.json").read_text())


def test_two_seeds_give_two_images_and_one_seed_the_same(styled_model, labels_file, tmp_path, capsys):
    first, provenance = _synthesize(labels_file, styled_model, tmp_path / "a", 1)
    again, _ = _synthesize(labels_file, styled_model, tmp_path / "b", 1)
    other, other_provenance = _synthesize(labels_file, styled_model, tmp_path / "c", 2)
    for m in OUTPUT_NAMES:
        assert np.array_equal(first[m], again[m]), m  # bit-exact on the CPU
    assert any(not np.array_equal(first[m], other[m]) for m in OUTPUT_NAMES)
    assert provenance["seed"] == 1 and provenance["seed_effective"] is True
    assert other_provenance["seed"] == 2 and other_provenance["seed_effective"] is True


def test_appearance_spread_zero_gives_every_seed_one_case_and_is_recorded(styled_model, labels_file, tmp_path,
                                                                         capsys):
    first, provenance = _synthesize(labels_file, styled_model, tmp_path / "a", 1, "--appearance-spread", "0")
    other, _ = _synthesize(labels_file, styled_model, tmp_path / "b", 2, "--appearance-spread", "0")
    wide, wide_provenance = _synthesize(labels_file, styled_model, tmp_path / "c", 1, "--appearance-spread", "0.5")
    for m in OUTPUT_NAMES:
        assert np.array_equal(first[m], other[m]), m
    assert any(not np.array_equal(first[m], wide[m]) for m in OUTPUT_NAMES)
    assert provenance["appearance_spread"] == 0.0 and provenance["seed_effective"] is False
    assert provenance["appearance_code"] == [0.0] * STYLED.style_dim  # no prior recorded: the standard normal's mean
    assert wide_provenance["appearance_spread"] == 0.5 and wide_provenance["seed_effective"] is True


@pytest.mark.parametrize("extra, message", [
    (["--appearance-spread", "2.5"], "medsynth: error: --appearance-spread must be a number from 0 to 2, got 2.5"),
    (["--appearance-spread", "-1"], "medsynth: error: --appearance-spread must be a number from 0 to 2, got -1.0"),
    (["--appearance-spread", "1.5"], "medsynth: error: --appearance-spread 1.5 is wider than model styled accepts "
                                     "(up to 1: the widest spread at which its images were measured believable; see "
                                     "its model card)"),
    (["--appearance-spread", "1", "--context", "case"],
     "medsynth: error: medsynth synthesize: --appearance-spread applies to whole synthetic cases, not with --context"),
])
def test_a_bad_appearance_spread_is_one_line_exit_2_and_writes_nothing(styled_model, labels_file, tmp_path, capsys,
                                                                       extra, message):
    argv = ["synthesize", str(labels_file), "-o", str(tmp_path / "out"), "--model", str(styled_model),
            "--device", "cpu", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [message]
    assert not (tmp_path / "out").exists()


def test_seed_without_an_appearance_code_is_recorded_as_ineffective(plain_model, labels_file, tmp_path, capsys):
    first, provenance = _synthesize(labels_file, plain_model, tmp_path / "a", 1)
    other, _ = _synthesize(labels_file, plain_model, tmp_path / "b", 2)
    for m in OUTPUT_NAMES:
        assert np.array_equal(first[m], other[m]), m
    assert provenance["seed"] == 1 and provenance["seed_effective"] is False
    assert "appearance_spread" not in provenance  # no code to scale


def test_rerender_keeps_the_seed_of_the_result_it_edits(styled_model):
    from MedSynthLib.edits import Translate

    engine = SynthesisEngine(resolve_model(styled_model), "cpu", "fp32")
    labelmap = synthetic_brain()
    edited = Translate((2.0, 0.0, 0.0))(labelmap)
    previous = engine.synthesize(labelmap, seed=5)
    rerendered = engine.rerender(previous, edited)
    full_same_seed = engine.synthesize(edited, seed=5).normalized
    full_other_seed = engine.synthesize(edited, seed=6).normalized
    changed = (edited.array != labelmap.array) & (edited.array > 0)
    assert changed.sum() > 50
    same = np.abs(rerendered.normalized[:, changed] - full_same_seed[:, changed]).mean()
    other = np.abs(rerendered.normalized[:, changed] - full_other_seed[:, changed]).mean()
    assert same < 0.5 * other
    assert rerendered.provenance["seed"] == 5


def test_the_shipped_default_model_samples_an_appearance_per_seed(labels_file, tmp_path):
    """The registry's default synthesis model has an appearance code and its prior: two seeds, two images; a seed,
    one image."""
    default = resolve_model(None)
    assert default.config["network"]["kind"] == "spade" and default.config["network"]["style_dim"] > 0
    first, provenance = _synthesize(labels_file, default.path, tmp_path / "a", seed=1)
    again, _ = _synthesize(labels_file, default.path, tmp_path / "b", seed=1)
    other, _ = _synthesize(labels_file, default.path, tmp_path / "c", seed=2)
    assert provenance["model"]["sha256"] == default.sha256 and provenance["seed"] == 1
    # Its codes come from its training patches' distribution (1000 patches), not the standard normal.
    assert default.appearance is not None and default.appearance.patches == 1000
    assert provenance["appearance_code"] == [float(v) for v in default.appearance.code(1)[0]]
    for m in OUTPUT_NAMES:
        assert np.array_equal(first[m], again[m])
    assert any(not np.array_equal(first[m], other[m]) for m in OUTPUT_NAMES)
