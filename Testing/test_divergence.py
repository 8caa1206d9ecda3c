"""training/divergence.py: the reference L1 and the guard's verdicts."""

from __future__ import annotations

import pytest
import torch

from MedSynthLib.training.divergence import DivergenceGuard, constant_prediction_l1


def test_constant_prediction_l1_is_the_mean_absolute_deviation_per_patch_and_contrast() -> None:
    real = torch.zeros(1, 2, 2, 2, 2)
    real[0, 0, 0] = 2.0  # contrast 0: half the voxels 2, half 0 -> mean 1, deviation 1
    assert constant_prediction_l1(real) == pytest.approx(0.5)  # contrast 1 is constant: deviation 0
    region = torch.zeros(1, 1, 2, 2, 2)
    region[0, 0, 1] = 1.0  # only the zero half of contrast 0 counts
    assert constant_prediction_l1(real, region) == pytest.approx(0.0)


def _patch(deviation: float) -> torch.Tensor:
    """A one-contrast patch, half +deviation and half -deviation: its constant prediction's L1 is ``deviation``."""
    real = torch.full((1, 1, 2, 2, 2), deviation)
    real[0, 0, 1] = -deviation
    return real


@pytest.mark.parametrize(("l1", "reference", "fires"), [(0.6, 0.41, True), (0.05, 0.41, False), (0.41, 0.41, False)])
def test_the_guard_fires_only_above_the_reference_after_its_window(l1: float, reference: float, fires: bool) -> None:
    guard = DivergenceGuard(total_steps=1000, start=0, window=10)  # first check at max(2 * 10, 1000 // 20) = 50
    verdicts = []
    for done in range(1, 61):
        guard.record(l1, _patch(reference))
        verdicts.append(guard.verdict(done))
        assert guard.due(done) == (done >= 50)
    assert all(v is None for v in verdicts[:49])
    assert (verdicts[-1] is not None) == fires


def test_a_resumed_run_fills_its_window_again_and_zero_turns_it_off() -> None:
    guard = DivergenceGuard(total_steps=1000, start=900, window=10)
    for done in range(901, 950):
        guard.record(0.9, _patch(0.4))
        assert guard.verdict(done) is None  # first check at step 950
    guard.record(0.9, _patch(0.4))
    assert "not learned" in guard.verdict(950)
    off = DivergenceGuard(total_steps=1000, start=0, window=0)
    for done in range(1, 200):
        off.record(9.0, _patch(0.1))
        assert not off.due(done) and off.verdict(done) is None
