"""benchmarks/label_information_probe.py: the oracles that bound what a label map can carry."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from conftest import load_benchmark

probe = load_benchmark("label_information_probe")


def _phantom(shape=(40, 44, 48)) -> tuple[np.ndarray, np.ndarray]:
    """Labels: a ball of brain, CSF core, GM shell, WM between; class values 100 / 300 / 500."""
    k, j, i = np.indices(shape)
    r = np.sqrt((k - shape[0] / 2) ** 2 + (j - shape[1] / 2) ** 2 + (i - shape[2] / 2) ** 2)
    labels = np.zeros(shape, np.uint8)
    labels[r < 18] = 2
    labels[r < 14] = 3
    labels[r < 5] = 1
    values = np.array([0.0, 100.0, 300.0, 500.0], np.float32)
    return labels, values[labels]


@pytest.mark.parametrize("sigma", [2.0, 8.0])
def test_class_local_means_never_mix_classes(sigma: float) -> None:
    labels, image = _phantom()
    out = probe.class_local_means(labels, image, sigma)
    # each class is constant: its local mean is that constant everywhere, even at the borders where a
    # plain Gaussian would blend the classes
    np.testing.assert_allclose(out, image, rtol=1e-5)
    plain = ndimage.gaussian_filter(image, sigma)
    assert np.abs(plain - image)[labels > 0].max() > 50


def test_class_local_means_follow_a_field_only_as_coarse_as_sigma() -> None:
    labels, image = _phantom()
    rng = np.random.default_rng(0)
    ramp = 1.0 + 0.004 * np.indices(image.shape)[2]  # a smooth field across the brain
    noisy = image * ramp + rng.normal(0, 20, image.shape).astype(np.float32) * (labels > 0)
    out = probe.class_local_means(labels, noisy.astype(np.float32), 4.0)
    inside = labels == 3
    # the smooth field is kept, the voxel noise averaged away
    assert np.abs(out - image * ramp)[inside].mean() < 0.3 * np.abs(noisy - image * ramp)[inside].mean()
    assert np.corrcoef(out[inside], (image * ramp)[inside])[0, 1] > 0.9


def test_bias_times_class_means_recovers_a_multiplicative_field() -> None:
    labels, image = _phantom((48, 48, 48))
    k, j, i = np.indices(image.shape)
    field = np.exp(0.25 * np.sin(i / 30.0) + 0.15 * (k / 48.0)).astype(np.float32)
    biased = image * field
    brain = labels > 0
    plain = probe.case_class_means(labels, biased)
    recovered = probe.bias_times_class_means(labels, biased, brain)
    plain_error = np.abs(plain - biased)[brain].mean()
    error = np.abs(recovered - biased)[brain].mean()
    assert error < 0.5 * plain_error, (error, plain_error)


def test_smoothing_in_the_brain_takes_nothing_from_the_background() -> None:
    labels, _ = _phantom()
    brain = labels > 0
    constant = np.where(brain, 700.0, 0.0).astype(np.float32)
    np.testing.assert_allclose(probe.smoothed_in_brain(constant, brain, 1.5)[brain], 700.0, rtol=1e-5)
    assert np.all(probe.smoothed_in_brain(constant, brain, 1.5)[~brain] == 0)
