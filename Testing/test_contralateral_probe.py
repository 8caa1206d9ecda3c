"""benchmarks/contralateral_probe.py: the brain's mirror plane and the class-restricted local mean it mixes in
(``masked_gaussian_mean`` of benchmarks/inpainting_eval.py)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import load_benchmark

probe = load_benchmark("contralateral_probe")


@pytest.mark.parametrize("centre", [15.0, 17.5, 21.0])
def test_the_mirror_maps_a_brain_symmetric_about_any_plane_onto_itself(centre: float) -> None:
    k, j, i = np.mgrid[:12, :14, :40]
    brain = ((k - 6) / 5) ** 2 + ((j - 7) / 6) ** 2 + ((i - centre) / 9) ** 2 <= 1
    brain[..., : int(centre)] &= j[..., : int(centre)] < 12  # a little asymmetry, as a tumour's mass effect
    shift = probe.mirror_shift(brain)
    assert shift == int(2 * centre - 39)  # x -> 2 * centre - x is the array's own mirror x -> 39 - x, rolled
    mirrored = probe.mirror(brain, shift)
    assert (mirrored & brain).sum() >= 0.95 * brain.sum()
    # The mirror is an involution: mirroring twice gives the array back.
    labels = np.random.default_rng(0).integers(0, 4, brain.shape)
    assert np.array_equal(probe.mirror(probe.mirror(labels, shift), shift)[..., 5:35], labels[..., 5:35])


def test_the_local_mean_reads_only_the_weighted_voxels() -> None:
    rng = np.random.default_rng(1)
    image = rng.normal(size=(20, 20, 20)).astype(np.float32)
    weight = np.zeros(image.shape, bool)
    weight[:, :, :10] = True
    mean, den = probe.masked_gaussian_mean(image, weight, 3.0)
    changed = image.copy()
    changed[~weight] = 100.0  # voxels of another class (or the region): never read
    assert np.allclose(probe.masked_gaussian_mean(changed, weight, 3.0)[0], mean)
    constant, _ = probe.masked_gaussian_mean(np.full(image.shape, 2.5, np.float32), weight, 3.0)
    assert np.allclose(constant[den > 0.05], 2.5, atol=1e-5)
