"""The structural-similarity term of the generator's loss (``lambda_ssim``, ``training/losses.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import training_cache_of
from MedSynthLib.cli import main
from MedSynthLib.evaluation.metrics import DATA_RANGE, SSIM_KERNEL, SSIM_SIGMA
from MedSynthLib.schema.errors import InputError
from MedSynthLib.synthesis.normalize import TISSUE_ZSCORE_SCALE
from MedSynthLib.training.losses import gaussian_ssim_map, masked_ssim_loss
from MedSynthLib.training.train import TrainConfig
from test_training import MICRO

pytestmark = pytest.mark.usefixtures("torch_threads")


def _record(monkeypatch, name: str, keep) -> None:
    """Wrap ``MedSynthLib.training.train.<name>`` so that each call first hands its arguments to ``keep``."""
    import MedSynthLib.training.train as train_module

    original = getattr(train_module, name)

    def recording(*args, **kwargs):
        keep(*args, **kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, name, recording)


def _train_two_steps(phantom_brats: Path, tmp_path: Path, **options) -> tuple[Path, bytes]:
    """A two-step run of the micro network with the brain-only L1 and ``options``: its folder and its TensorBoard
    events' bytes."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(MICRO, steps=2, checkpoint_every=2, val_every=1000, l1_region="brain",
                                      **options)))
    run = tmp_path / "run"
    assert main(["train", "--data", str(phantom_brats), "-o", str(run), "--config", str(config), "--device", "cpu",
                 "--cache", str(training_cache_of(phantom_brats))]) == 0
    return run, b"".join(p.read_bytes() for p in (run / "tensorboard").rglob("events.out.tfevents.*"))


@pytest.mark.parametrize("shape", [(2, 3, 24, 20), (1, 4, 18, 16, 20)])
def test_the_ssim_map_is_monais(shape: tuple[int, ...]) -> None:
    from monai.metrics.regression import compute_ssim_and_cs

    rng = torch.Generator().manual_seed(len(shape))
    target = torch.rand(shape, generator=rng) * 2 - 1
    prediction = target + 0.4 * torch.randn(shape, generator=rng)
    spatial_dims = len(shape) - 2
    expected, _ = compute_ssim_and_cs(prediction, target, spatial_dims, [SSIM_KERNEL] * spatial_dims,
                                      [SSIM_SIGMA] * spatial_dims, 0.5, "gaussian", 0.01, 0.03)
    ours = gaussian_ssim_map(prediction, target, 0.5)
    assert ours.shape == expected.shape == shape[:2] + tuple(n - SSIM_KERNEL + 1 for n in shape[2:])
    assert torch.allclose(ours, expected, atol=1e-4)
    assert 0.1 < float(ours.mean()) < 0.9  # neither equal nor unrelated images: the comparison means something


def test_the_loss_counts_only_where_the_weights_are() -> None:
    rng = torch.Generator().manual_seed(5)
    real = torch.rand((1, 2, 24, 24, 24), generator=rng)
    assert float(masked_ssim_loss(real.clone(), real, None, 1.0)) == pytest.approx(0.0, abs=1e-6)

    weights = torch.zeros((1, 1, 24, 24, 24))
    weights[:, :, 8:16, 8:16, 8:16] = 1.0
    prediction = (real + 0.3 * torch.randn(real.shape, generator=rng)).requires_grad_(True)
    loss = masked_ssim_loss(prediction, real, weights, 1.0)
    loss.backward()
    loss = loss.detach()
    assert 0.05 < float(loss) < 1.0
    half = SSIM_KERNEL // 2
    reach = torch.zeros((24, 24, 24), dtype=torch.bool)
    reach[8 - half:16 + half, 8 - half:16 + half, 8 - half:16 + half] = True  # the windows of counted voxels
    grad = prediction.grad.abs().sum(dim=(0, 1))
    assert grad[~reach].max() == 0 and grad[8:16, 8:16, 8:16].min() > 0

    # Better inside the counted voxels -> lower loss; a change outside their windows -> the same loss.
    closer = prediction.detach().clone()
    closer[:, :, 8:16, 8:16, 8:16] = real[:, :, 8:16, 8:16, 8:16]
    assert float(masked_ssim_loss(closer, real, weights, 1.0)) < float(loss)
    elsewhere = prediction.detach().clone()
    elsewhere[:, :, :2] = 5.0
    assert float(masked_ssim_loss(elsewhere, real, weights, 1.0)) == pytest.approx(float(loss), abs=1e-6)


def test_the_interior_loss_keeps_its_windows_inside_the_region() -> None:
    """With ``interior`` no window crosses the region's border: the output outside the region gets no gradient
    and the values there do not change the loss (without it, windows of the region's edge voxels reach out)."""
    rng = torch.Generator().manual_seed(8)
    real = torch.rand((1, 2, 28, 28, 28), generator=rng)
    weights = torch.zeros((1, 1, 28, 28, 28))
    weights[:, :, 4:24, 4:24, 4:24] = 1.0
    outside = weights[0, 0] == 0
    grads = {}
    for interior in (False, True):
        prediction = (real + 0.3 * torch.randn(real.shape, generator=rng)).requires_grad_(True)
        masked_ssim_loss(prediction, real, weights, 1.0, interior=interior).backward()
        grads[interior] = prediction.grad.abs().sum(dim=(0, 1))
    assert grads[False][outside].max() > 0
    assert grads[True][outside].max() == 0 and grads[True][~outside].max() > 0
    # Only the 10^3 voxels whose 11^3 window fits in the 20^3 region count: their SSIM, averaged.
    prediction = real + 0.3 * torch.randn(real.shape, generator=rng)
    ssim = gaussian_ssim_map(prediction, real, 1.0)[:, :, 4:14, 4:14, 4:14]
    assert float(masked_ssim_loss(prediction, real, weights, 1.0, interior=True)) == pytest.approx(
        1.0 - float(ssim.mean()), abs=1e-6)


def test_without_the_contrast_factor_a_flatter_prediction_is_not_penalised() -> None:
    """The full SSIM scores a prediction with half the real local spread well below 1, so a smooth generator
    gains by spreading its classes apart; luminance x structure scores it by its correlation alone."""
    rng = torch.Generator().manual_seed(3)
    real = 0.5 * torch.randn((1, 2, 24, 24, 24), generator=rng)  # local means near 0: luminance near 1
    for contrast in (True, False):
        same = gaussian_ssim_map(real, real, 8.0, contrast=contrast).mean()
        assert float(same) == pytest.approx(1.0, abs=1e-5)
    full = gaussian_ssim_map(0.5 * real, real, 8.0).mean()
    structure = gaussian_ssim_map(0.5 * real, real, 8.0, contrast=False).mean()
    assert float(full) < 0.85 and float(structure) > 0.95
    # Unrelated images score low in both; a flat patch keeps finite gradients without its contrast factor.
    other = 0.5 * torch.randn((1, 2, 24, 24, 24), generator=rng)
    assert float(gaussian_ssim_map(other, real, 8.0, contrast=False).mean()) < 0.2
    flat = torch.zeros((1, 2, 24, 24, 24), requires_grad=True)
    masked_ssim_loss(flat, real, None, 8.0, contrast=False).backward()
    assert torch.isfinite(flat.grad).all()


def test_an_offset_moves_zero_out_of_the_tissue_so_a_small_level_error_is_not_a_sign_error() -> None:
    """Two windows whose means lie either side of zero: without an offset the luminance factor scores the level
    error as opposite signs (SSIM below 0); with zero moved out of the tissue the same error costs almost nothing,
    and a perfect prediction scores 1 either way."""
    torch.manual_seed(0)
    texture = 0.01 * torch.randn(1, 1, 24, 24, 24)
    real = texture + 0.004
    prediction = texture - 0.004
    data_range = DATA_RANGE / TISSUE_ZSCORE_SCALE
    assert float(masked_ssim_loss(prediction, real, None, data_range)) > 1.0
    assert float(masked_ssim_loss(prediction, real, None, data_range, offset=1.0)) < 0.01
    assert float(masked_ssim_loss(real.clone(), real, None, data_range, offset=1.0)) == pytest.approx(0.0, abs=1e-5)


def test_ssim_offset_is_off_by_default_and_needs_the_term() -> None:
    assert TrainConfig().ssim_offset == 0.0
    assert TrainConfig.from_json(dict(MICRO, lambda_ssim=1.0, ssim_offset=1.0,
                                      normalization="tissue_zscore")).ssim_offset == 1.0
    with pytest.raises(InputError, match="ssim_offset shapes the SSIM term: it needs lambda_ssim above 0"):
        TrainConfig.from_json(dict(MICRO, ssim_offset=1.0, normalization="tissue_zscore"), "cfg.json")


def test_ssim_contrast_is_on_by_default_and_needs_the_term() -> None:
    assert TrainConfig().ssim_contrast is True
    assert TrainConfig.from_json(dict(MICRO, lambda_ssim=1.0, ssim_contrast=False,
                                      normalization="tissue_zscore")).ssim_contrast is False
    with pytest.raises(InputError, match="ssim_contrast shapes the SSIM term: it needs lambda_ssim above 0"):
        TrainConfig.from_json(dict(MICRO, ssim_contrast=False, normalization="tissue_zscore"), "cfg.json")


def test_lambda_ssim_is_checked_and_off_by_default() -> None:
    assert TrainConfig().lambda_ssim == 0.0 and TrainConfig().ssim_interior is False
    assert TrainConfig.from_json(dict(MICRO, lambda_ssim=1.0, ssim_interior=True,
                                      normalization="tissue_zscore")).ssim_interior is True
    with pytest.raises(InputError, match="ssim_interior shapes the SSIM term: it needs lambda_ssim above 0"):
        TrainConfig.from_json(dict(MICRO, ssim_interior=True, normalization="tissue_zscore"), "cfg.json")
    assert TrainConfig.from_json(dict(MICRO, lambda_ssim=10.0, normalization="tissue_zscore")).lambda_ssim == 10.0
    with pytest.raises(InputError, match="lambda_ssim .* needs a z-score normalization .* not 'percentile'"):
        TrainConfig.from_json(dict(MICRO, lambda_ssim=10.0), "cfg.json")
    with pytest.raises(InputError, match="lambda_ssim"):
        TrainConfig.from_json(dict(MICRO, lambda_ssim=-1.0, normalization="tissue_zscore"), "cfg.json")


def test_ssim_region_places_the_term_on_the_tumour_where_the_loss_counts() -> None:
    from MedSynthLib.training.train import ssim_weights

    labels = torch.zeros((2, 6, 6), dtype=torch.uint8)
    labels[:, 1:5, 1:5] = 3  # white matter
    labels[0, 2:4, 2:4] = 6  # enhancing tumour in the first patch only
    labels[0, 2, 4] = 5  # oedema at the brain's edge, where the loss does not count below
    counted = (labels > 0).unsqueeze(1).float()
    counted[0, 0, 2, 4] = 0.0
    assert ssim_weights("loss", counted, labels) is counted
    assert ssim_weights("loss", None, labels) is None
    tumour = ssim_weights("tumour", counted, labels)
    expected = torch.zeros((2, 1, 6, 6))
    expected[0, 0, 2:4, 2:4] = 1.0
    assert torch.equal(tumour, expected)  # tumour voxels where the loss counts; none in the second patch
    assert torch.equal(ssim_weights("tumour", None, labels), ((labels >= 4).unsqueeze(1)).float())

    assert TrainConfig().ssim_region == "loss"
    assert TrainConfig.from_json(dict(MICRO, lambda_ssim=1.0, ssim_region="tumour",
                                      normalization="tissue_zscore")).ssim_region == "tumour"
    with pytest.raises(InputError, match="ssim_region must be one of \\['loss', 'tumour'\\], not 'brain'"):
        TrainConfig.from_json(dict(MICRO, lambda_ssim=1.0, ssim_region="brain", normalization="tissue_zscore"),
                              "cfg.json")
    with pytest.raises(InputError, match="ssim_region places the SSIM term: it needs lambda_ssim above 0"):
        TrainConfig.from_json(dict(MICRO, ssim_region="tumour", normalization="tissue_zscore"), "cfg.json")


def test_training_adds_the_ssim_term_where_the_l1_counts(phantom_brats: Path, tmp_path: Path, monkeypatch) -> None:
    import MedSynthLib.training.train as train_module

    calls: list[tuple[torch.Tensor | None, float, bool, bool]] = []
    original = train_module.masked_ssim_loss

    def recording(prediction, real, weights, data_range, interior=False, contrast=True, offset=0.0):
        calls.append((None if weights is None else weights.detach().clone(), data_range, interior, contrast, offset))
        return original(prediction, real, weights, data_range, interior=interior, contrast=contrast, offset=offset)

    monkeypatch.setattr(train_module, "masked_ssim_loss", recording)
    cache = training_cache_of(phantom_brats)  # entries are keyed by the normalisation
    for weight in (0.0, 5.0):
        calls.clear()
        config = tmp_path / f"ssim{weight}.json"
        config.write_text(json.dumps(dict(MICRO, steps=2, checkpoint_every=2, val_every=1000, l1_region="brain",
                                          normalization="tissue_zscore", lambda_ssim=weight,
                                          ssim_interior=weight > 0, ssim_contrast=weight == 0,
                                          ssim_offset=1.0 if weight > 0 else 0.0)))
        run = tmp_path / f"run{weight}"
        args = ["train", "--data", str(phantom_brats), "-o", str(run), "--config", str(config), "--device", "cpu",
                "--cache", str(cache)]
        assert main(args) == 0
        recorded = json.loads((run / "train_config.json").read_text())["config"]
        assert recorded["lambda_ssim"] == weight
        events = b"".join(p.read_bytes() for p in (run / "tensorboard").rglob("events.out.tfevents.*"))
        if weight == 0.0:
            assert calls == [] and b"loss/ssim" not in events
            continue
        assert len(calls) == 2 and b"loss/ssim" in events
        for region, data_range, interior, contrast, offset in calls:
            # The brain of the patch (where the L1 counts), on the metrics' scale of 8 z, as configured.
            assert set(region.unique().tolist()) == {0.0, 1.0}
            assert data_range == pytest.approx(DATA_RANGE / TISSUE_ZSCORE_SCALE) and interior is True
            assert contrast is False and offset == 1.0


def test_below_floor_is_the_mean_shortfall_where_the_loss_counts() -> None:
    from MedSynthLib.training.train import below_floor

    prediction = torch.tensor([[[0.5, -0.9, -0.2, -1.0]], [[0.0, 0.0, -0.6, 0.3]]]).reshape(1, 2, 4)
    floor = torch.tensor([-0.5, -0.4])
    # shortfalls: contrast 0 -> 0, 0.4, 0, 0.5; contrast 1 -> 0, 0, 0.2, 0
    assert float(below_floor(prediction, floor, None)) == pytest.approx(1.1 / 8)
    counted = torch.tensor([[[1.0, 0.0, 1.0, 1.0]]])
    assert float(below_floor(prediction, floor, counted)) == pytest.approx(0.7 / 6)
    assert float(below_floor(prediction + 2.0, floor, counted)) == 0.0
    with pytest.raises(InputError, match="lambda_floor needs the floor of a z-score normalization"):
        TrainConfig.from_json(dict(MICRO, lambda_floor=10.0), "cfg.json")


def test_training_holds_the_output_above_the_floor_the_model_will_carry(phantom_brats: Path, tmp_path: Path,
                                                                        monkeypatch) -> None:
    floors: list[torch.Tensor] = []
    _record(monkeypatch, "below_floor", lambda prediction, floor, counted: floors.append(floor.detach().clone()))
    run, events = _train_two_steps(phantom_brats, tmp_path, normalization="tissue_zscore", lambda_floor=100.0)
    assert len(floors) == 2 and torch.equal(floors[0], floors[1])
    assert b"loss/below_floor" in events
    # The floor in the network's units is the exported model's floor (scanner units) on its z scale.
    intensity = json.loads((run / "model" / "config.json").read_text())["intensity"]
    for index, m in enumerate(("t1", "t1ce", "t2", "flair")):
        entry = intensity[m]
        floor_z = (entry["floor"] - entry["mean"]) / entry["std"]
        assert float(floors[0][index]) * TISSUE_ZSCORE_SCALE == pytest.approx(floor_z, rel=1e-4, abs=1e-4)
        assert float(floors[0][index]) < 0


def test_training_counts_the_ssim_term_on_the_tumour_only(phantom_brats: Path, tmp_path: Path, monkeypatch) -> None:
    """With ``ssim_region`` "tumour" the term gets the tumour's voxels where the loss counts, and a patch
    without tumour adds no term."""
    import MedSynthLib.training.train as train_module

    patches: list[torch.Tensor] = []
    given: list[torch.Tensor] = []
    original_weights, original_loss = train_module.ssim_weights, train_module.masked_ssim_loss

    def recording_weights(ssim_region, counted, labels):
        patches.append(labels.detach().clone())
        return original_weights(ssim_region, counted, labels)

    def recording_loss(prediction, real, weights, data_range, interior=False, contrast=True, offset=0.0):
        given.append(weights.detach().clone())
        return original_loss(prediction, real, weights, data_range, interior=interior, contrast=contrast,
                             offset=offset)

    monkeypatch.setattr(train_module, "ssim_weights", recording_weights)
    monkeypatch.setattr(train_module, "masked_ssim_loss", recording_loss)
    config = tmp_path / "tumour.json"
    config.write_text(json.dumps(dict(MICRO, steps=4, checkpoint_every=4, val_every=1000, l1_region="brain",
                                      normalization="tissue_zscore", lambda_ssim=5.0, ssim_region="tumour",
                                      tumour_fraction=0.5)))
    run = tmp_path / "run"
    assert main(["train", "--data", str(phantom_brats), "-o", str(run), "--config", str(config), "--device", "cpu",
                 "--cache", str(training_cache_of(phantom_brats))]) == 0
    assert len(patches) == 4
    with_tumour = [labels for labels in patches if bool((labels >= 4).any())]
    assert with_tumour and len(with_tumour) < len(patches)  # patches with and without tumour
    assert len(given) == len(with_tumour)
    for labels, weights in zip(with_tumour, given):
        assert torch.equal(weights, (labels >= 4).unsqueeze(1).float())  # the tumour lies in the brain


def test_the_class_level_term_compares_class_means_where_they_are_big_enough() -> None:
    from MedSynthLib.training.losses import class_level_loss

    real = torch.zeros(1, 2, 4, 4)
    real[:, :, :2] = 1.0  # class 0: the top half, class 1: the bottom half
    classes = torch.zeros(1, 2, 4, 4)
    classes[:, 0, :2] = 1.0
    classes[:, 1, 2:] = 1.0
    assert float(class_level_loss(real, real, classes, min_voxels=4)) == 0.0
    # Texture that keeps each class's mean costs nothing; a level shift of one class costs its share.
    texture = torch.tensor([0.5, -0.5]).repeat(8).reshape(1, 1, 4, 4).expand(1, 2, 4, 4)
    assert float(class_level_loss(real + texture, real, classes, min_voxels=4)) == pytest.approx(0.0, abs=1e-7)
    shifted = real.clone()
    shifted[:, 1, 2:] += 0.4  # contrast 1, class 1
    assert float(class_level_loss(shifted, real, classes, min_voxels=4)) == pytest.approx(0.4 / 4)
    # Classes below min_voxels in the patch do not count; none left gives 0.
    classes[:, 1, 3:] = 0.0  # class 1 now 4 voxels in row 2 only
    assert float(class_level_loss(shifted, real, classes, min_voxels=5)) == 0.0
    assert float(class_level_loss(shifted, real, classes, min_voxels=4)) == pytest.approx(0.4 / 4)


def test_lambda_class_level_is_checked_and_off_by_default() -> None:
    assert TrainConfig().lambda_class_level == 0.0
    assert TrainConfig.from_json(dict(MICRO, lambda_class_level=50.0)).lambda_class_level == 50.0
    with pytest.raises(InputError, match="lambda_class_level"):
        TrainConfig.from_json(dict(MICRO, lambda_class_level=-1.0), "cfg.json")


def test_training_adds_the_class_level_term_per_class_where_the_loss_counts(phantom_brats: Path, tmp_path: Path,
                                                                             monkeypatch) -> None:
    from MedSynthLib.schema.labels import NUM_CLASSES

    masks: list[torch.Tensor] = []
    _record(monkeypatch, "class_level_loss", lambda prediction, real, classes: masks.append(classes.detach().clone()))
    run, events = _train_two_steps(phantom_brats, tmp_path, lambda_class_level=50.0)
    assert len(masks) == 2
    for classes in masks:
        assert classes.shape[1] == NUM_CLASSES
        assert float(classes[:, 0].sum()) == 0.0  # the background is outside the brain, where the loss does not count
        assert set(classes.sum(1).unique().tolist()) <= {0.0, 1.0} and float(classes.sum()) > 0
    assert b"loss/class_level" in events
    assert json.loads((run / "train_config.json").read_text())["config"]["lambda_class_level"] == 50.0


def test_the_evaluation_ssim_map_is_monais_on_a_whole_volume() -> None:
    """``medsynth evaluate``'s map (reflect-padded, same shape as its inputs) filters separably for speed; it is still
    MONAI's ``compute_ssim_and_cs`` on the same padded volumes, as every recorded score was computed."""
    import numpy as np
    from monai.metrics.regression import compute_ssim_and_cs

    from MedSynthLib.evaluation.metrics import ssim_map

    rng = np.random.default_rng(48)
    real = rng.normal(size=(19, 23, 27)).astype(np.float32)
    synthetic = (real + rng.normal(scale=0.7, size=real.shape)).astype(np.float32)
    pad = SSIM_KERNEL // 2
    padded = [torch.from_numpy(np.pad(v, pad, mode="reflect"))[None, None] for v in (real, synthetic)]
    expected, _ = compute_ssim_and_cs(*padded, 3, [SSIM_KERNEL] * 3, [SSIM_SIGMA] * 3, DATA_RANGE, "gaussian",
                                      0.01, 0.03)
    ours = ssim_map(real, synthetic)
    assert ours.shape == real.shape
    np.testing.assert_allclose(ours, expected[0, 0].numpy(), atol=1e-4)
    assert 0.2 < float(ours.mean()) < 0.9
