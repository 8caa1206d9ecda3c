"""benchmarks/synthesis_structure_probe.py: a model's class intensities scored apart from what it draws inside them."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import load_benchmark

probe = load_benchmark("synthesis_structure_probe")


def _phantom(shape=(36, 40, 44)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels of a ball (CSF core, WM, GM shell), its brain mask and a real image: class values plus a smooth ramp."""
    k, j, i = np.indices(shape)
    r = np.sqrt((k - shape[0] / 2) ** 2 + (j - shape[1] / 2) ** 2 + (i - shape[2] / 2) ** 2)
    labels = np.zeros(shape, np.uint8)
    labels[r < 16] = 2
    labels[r < 12] = 3
    labels[r < 4] = 1
    values = np.array([0.0, 100.0, 300.0, 500.0], np.float32)
    real = values[labels] * (1.0 + 0.01 * i) * (labels > 0)
    return labels, labels > 0, real.astype(np.float32)


def test_drawing_the_real_structure_beats_flat_painting_and_noise_does_not() -> None:
    labels, brain, real = _phantom()
    rng = np.random.default_rng(0)
    # a model with the right structure (the ramp) but its own scale and offset: z-scoring removes both
    good = probe.probe_contrast(real, 2.0 * real + 50.0 * brain, labels, brain)
    assert good["model"] > 0.99
    assert good["model"] > good["flat_model_means"] + 0.02
    # a model whose drawing inside the classes is noise: flat painting with its own means scores higher
    noisy = real + rng.normal(0, 60, real.shape).astype(np.float32) * brain
    bad = probe.probe_contrast(real, noisy, labels, brain)
    assert bad["flat_model_means"] > bad["model"] + 0.05
    # the oracle rows read only the real image and the labels: the same for both models
    assert bad["flat_own_means"] == good["flat_own_means"]
    assert bad["own_means_smoothed"] == good["own_means_smoothed"]


@pytest.mark.parametrize("offset", [-80.0, 0.0, 80.0])
def test_class_mean_errors_are_measured_and_only_the_intensities_are_replaced(offset: float) -> None:
    labels, brain, real = _phantom()
    synthetic = real.copy()
    synthetic[labels == 2] += offset  # grey matter off by the offset, the rest right
    out = probe.probe_contrast(real, synthetic, labels, brain)
    errors = out["model_mean_minus_own"]
    assert set(errors) == {"1", "2", "3"}
    # a class off in scanner units is off in z (z-scoring spreads the error over the classes); a model that
    # differs from the real image by a global scale and offset only has no class error at all
    if offset:
        assert max(abs(e) for e in errors.values()) > 0.2
    else:
        assert max(abs(e) for e in errors.values()) < 1e-5
    rescaled = probe.probe_contrast(real, 3.0 * synthetic + offset * brain, labels, brain)["model_mean_minus_own"]
    np.testing.assert_allclose([rescaled[k] for k in errors], [errors[k] for k in errors], atol=1e-4)
    # with the class means made exact the model's own structure (the ramp, rescaled by its z-scoring) is left:
    # nearly the real image, and better than the flat painting that lacks it
    assert out["model_structure_own_means"] > 0.95
    assert out["model_structure_own_means"] > out["flat_own_means"] + 0.02


def test_pooling_takes_every_case_of_every_fold_once() -> None:
    def row(name: str, model: float, flat: float) -> dict:
        scores = {k: 0.3 for k in probe.ROWS}
        return {"case": name, **{m: {**scores, "model": model, "flat_model_means": flat} for m in probe.MODALITIES}}

    fold0 = {"fold": 0, "model": {"name": "a"}, "per_case": [row("p", 0.2, 0.3), row("q", 0.4, 0.1)]}
    fold1 = {"fold": 1, "model": {"name": "b"}, "per_case": [row("r", 0.6, 0.5)]}
    pooled = probe.pool([fold0, fold1])
    assert pooled["cases"] == 3 and pooled["folds"] == [0, 1]
    # a mean over the three cases, not over the two folds' means (0.35)
    assert abs(pooled["summary"]["model"]["mean"] - 0.4) < 1e-9
    assert pooled["flat_model_means_beats_model"] == {m: 1 for m in probe.MODALITIES}
