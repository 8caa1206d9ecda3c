"""Contrast rules and the checkerboard measure (MedSynthLib.evaluation.image_checks), and the z-score clip range,
on real BraTS cases and on deliberately wrong images."""

from __future__ import annotations

import numpy as np
import pytest

from MedSynthLib.evaluation.image_checks import (CONTRAST_RULES, check_contrast_rules, checkerboard_ratio, class_medians,
                                                 layer_signal_shares, nyquist_power, outermost_layer)
from MedSynthLib.schema.labels import Label

# Real cases the rules are read on: the five BraTS 2021 cases (the 27-case table is in the model card,
# measured by benchmarks/measure_normalization.py).


@pytest.fixture(scope="module")
def real_cases(brats_derived) -> list[tuple[str, dict[str, np.ndarray], np.ndarray]]:
    """(name, images, derived labels) of each real case (read and derived once per session)."""
    return [(name, case.images, labelmap.array) for name, (case, labelmap, _) in sorted(brats_derived.items())]


# The T2 rule needs a CSF class that is CSF: the earlier T1-only anatomy failed it on 9 of the 27 real
# cases; the atlas model (cases/atlas_anatomy.py) passes it on every case (docs/anatomy_check.md).


# Known defect, reported rather than hidden: with the atlas-em anatomy the CSF class's median FLAIR on the
# BraTS 2021 cases is not below white matter's (BraTS2021_00006: CSF -0.28 z, WM -0.42 z; 00000: -0.36 vs
# -0.38), on 4 of the 5, with or without the peritumoural T1-only band and with every registration sample:
# the 1 mm CSF class holds partial-volume sulcal voxels.  Strict: the mark must go when the anatomy is fixed.
_KNOWN_FAILING = {"FLAIR: CSF darkest": "atlas-em CSF class not darker than WM on FLAIR on 4 of 5 BraTS 2021 cases"}


@pytest.mark.parametrize("rule", [
    pytest.param(rule.name, marks=pytest.mark.xfail(strict=True, reason=_KNOWN_FAILING[rule.name]))
    if rule.name in _KNOWN_FAILING else rule.name for rule in CONTRAST_RULES])
def test_contrast_rules_hold_on_real_cases(real_cases, rule: str) -> None:
    """Each rule holds on all but at most one of the real cases where its classes are present.

    Known exception (reported, not hidden): BraTS2021_00002's necrosis is not darker than white matter
    on T1 (over the 27 real cases, T1 NCR < WM fails on 4: necrosis and non-enhancing core can be
    T1-bright).
    """
    passed = []
    for name, images, labels in real_cases:
        result = next(r for r in check_contrast_rules(images, labels) if r["rule"] == rule)
        if result["passed"] is not None:
            passed.append(result["passed"])
    assert len(passed) >= 4
    assert sum(passed) >= len(passed) - 1, passed


def test_contrast_rules_fail_on_a_wrong_image(real_cases) -> None:
    """Swapping T1's grey and white matter and making oedema dark on FLAIR breaks exactly those rules."""
    name, images, labels = real_cases[0]
    wrong = {m: image.copy() for m, image in images.items()}
    gm, wm = labels == Label.GM, labels == Label.WM
    wrong["t1"][gm] = np.median(images["t1"][wm])
    wrong["t1"][wm] = np.median(images["t1"][gm])
    wrong["flair"][labels == Label.ED] = np.median(images["flair"][labels == Label.CSF])
    results = {r["rule"]: r for r in check_contrast_rules(wrong, labels)}
    assert results["T1: GM < WM"]["passed"] is False and results["T1: GM < WM"]["margin"] < 0
    assert results["FLAIR: ED > GM"]["passed"] is False
    assert results["FLAIR: CSF darkest"]["passed"] is False  # oedema now as dark as CSF
    assert results["T2: ED > WM"]["passed"] is True  # untouched modalities still pass


def test_contrast_rules_on_a_phantom_and_absent_classes() -> None:
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[2:18, 2:18, 2:18] = Label.WM
    labels[2:18, 2:18, 2:6] = Label.GM
    labels[2:18, 2:18, 2:4] = Label.CSF
    ramp = {Label.CSF: 1.0, Label.GM: 2.0, Label.WM: 3.0}
    t1 = np.zeros(labels.shape, np.float32)
    for value, intensity in ramp.items():
        t1[labels == value] = intensity
    images = {"t1": t1, "t1ce": t1, "t2": 4.0 - t1 * (labels > 0), "flair": t1}
    results = {r["rule"]: r for r in check_contrast_rules(images, labels)}
    assert results["T1: CSF < GM"]["passed"] and results["T1: GM < WM"]["passed"]
    assert results["T2: CSF brightest"]["passed"] and results["FLAIR: CSF darkest"]["passed"]
    assert results["T1: NCR < WM"]["passed"] is None  # no necrosis in this map
    assert results["T1ce: ET > WM"]["passed"] is None
    # Equal medians fail strictly and pass with a tolerance.
    flat = dict(images, t1=np.where(labels > 0, 2.0, 0.0).astype(np.float32))
    strict = {r["rule"]: r for r in check_contrast_rules(flat, labels)}
    tolerant = {r["rule"]: r for r in check_contrast_rules(flat, labels, tolerance=0.1)}
    assert strict["T1: GM < WM"]["passed"] is False and tolerant["T1: GM < WM"]["passed"] is True
    medians = class_medians(t1, labels, labels > 0)
    assert medians[Label.CSF] < medians[Label.GM] < medians[Label.WM]


def test_checkerboard_measure(real_cases) -> None:
    """The real image scores 1 against itself; a period-2 pattern raises it; a blur lowers it."""
    from scipy import ndimage

    name, images, labels = real_cases[0]
    brain = labels > 0
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(brain))
    real = images["t2"][box].astype(np.float32)
    mask = brain[box]
    grids = np.indices(real.shape).sum(0)
    pattern = np.where(grids % 2 == 0, 1.0, -1.0).astype(np.float32)
    checkered = real + 0.1 * real[mask].std() * pattern * mask
    blurred = ndimage.gaussian_filter(real, 1.0)
    assert checkerboard_ratio(real, real, mask) == pytest.approx(1.0)
    assert checkerboard_ratio(real, checkered, mask) > 2.0
    assert checkerboard_ratio(real, blurred, mask) < 0.5
    # Along one axis only (what a transposed convolution leaves along each axis) is seen as well.
    stripes = real + 0.1 * real[mask].std() * np.where(np.indices(real.shape)[0] % 2 == 0, 1.0, -1.0) * mask
    assert nyquist_power(stripes.astype(np.float32), mask) > 2.0 * nyquist_power(real, mask)


def test_default_zscore_range_keeps_the_tumour(real_cases) -> None:
    """The healthy-tissue z-score's default clip range clips under 0.5 % of any real tumour's voxels.

    At the earlier +-6 z, 19 % of BraTS2021_00006's FLAIR tumour was clipped.
    """
    from MedSynthLib.synthesis.normalize import HealthyTissueZScore

    for name, images, labels in real_cases:
        healthy = (labels >= Label.CSF) & (labels <= Label.WM)
        tumour = labels >= Label.NCR
        for modality, image in images.items():
            norm = HealthyTissueZScore.fit(image, healthy)
            z = (image[tumour] - norm.mean) / norm.std
            clipped = float(np.mean(np.abs(z) >= norm.scale))
            assert clipped < 0.005, (name, modality, clipped)


def test_zscore_kinds_fit_their_reference_and_range() -> None:
    """``tissue_zscore`` takes its statistics from grey + white matter only and has its own default range;
    old models' stored ranges are kept."""
    from MedSynthLib.synthesis.normalize import (TISSUE_ZSCORE_SCALE, ZSCORE_SCALE, HealthyTissueZScore,
                                       normalizer_from_json)

    rng = np.random.default_rng(0)
    labels = rng.integers(1, 4, (12, 12, 12)).astype(np.uint8)
    image = np.choose(labels - 1, [3000.0, 900.0, 1100.0]) + rng.normal(0, 20, labels.shape)
    healthy = (labels >= Label.CSF) & (labels <= Label.WM)
    tissue = (labels == Label.GM) | (labels == Label.WM)
    wide = HealthyTissueZScore.fit(image, healthy)
    narrow = HealthyTissueZScore.fit(image, tissue, "tissue_zscore")
    assert (wide.kind, wide.scale) == ("healthy_zscore", ZSCORE_SCALE)
    assert (narrow.kind, narrow.scale) == ("tissue_zscore", TISSUE_ZSCORE_SCALE)
    assert narrow.std == pytest.approx(float(image[tissue].std())) and narrow.std < 0.2 * wide.std
    old = normalizer_from_json({"mean": 1.0, "std": 2.0, "scale": 6.0, "kind": "healthy_zscore"})
    assert old.scale == 6.0


def test_outermost_layer_is_the_brains_shell_one_voxel_thick() -> None:
    """A 5^3 cube's outermost layer is the cube less its 3^3 core (face neighbours define the inside); a brain one
    voxel thin is all border."""
    brain = np.zeros((9, 9, 9), bool)
    brain[2:7, 2:7, 2:7] = True
    layer = outermost_layer(brain)
    assert layer.sum() == 5 ** 3 - 3 ** 3
    assert not layer[3:6, 3:6, 3:6].any() and layer[2, 4, 4] and layer[6, 6, 6]
    sheet = np.zeros((5, 5, 5), bool)
    sheet[2] = True
    assert np.array_equal(outermost_layer(sheet), sheet)


def test_layer_signal_shares_count_the_layer_at_zero_and_at_or_below_each_floor() -> None:
    layer = np.zeros((2, 5), bool)
    layer[0] = True
    t1 = np.array([[0.0, 0.0, 0.2, 0.5, 1.0], [0.0] * 5])  # outside the layer: not counted
    flair = np.array([[0.1, 0.3, 0.3, 0.9, 2.0], [0.0] * 5])
    zero, at_floor = layer_signal_shares({"t1": t1, "flair": flair}, layer, {"t1": 0.2, "flair": 0.3})
    assert zero == {"t1": 0.4, "flair": 0.0}
    assert at_floor == {"t1": 0.6, "flair": 0.6}
