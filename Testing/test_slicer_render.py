"""Offscreen VTK rendering of a MedSynth scene (docs/figures/slicer_render.py, the README figure's code path) on a small phantom.

Skipped with the reason when no offscreen OpenGL context (EGL / OSMesa) can be
created on this machine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedSynth"))
sys.path.insert(0, str(REPO / "docs" / "figures"))  # the figure tooling lives with the figures

try:
    import slicer

    slicer.vtkMRMLScene  # noqa: B018
except (ImportError, AttributeError) as exc:  # pragma: no cover - depends on the environment
    if os.environ.get("CI", "").lower() == "true":
        raise
    pytest.skip(f"slicer-core is not installed ({exc})", allow_module_level=True)

from MedSynthSlicerLib import mrml  # noqa: E402
from slicer_render import offscreen_render_window, oriented_axial_slice, render_scene_figure  # noqa: E402


def test_axial_slice_orientation_is_radiological():
    """Row 0 anterior, column 0 the patient's right, whatever the IJK axes' directions."""
    array = np.zeros((3, 4, 5), np.int16)  # k, j, i
    array[1, 0, 0] = 1  # i = 0, j = 0
    # LPS-stored volume (BraTS-like): i -> -R (left), j -> -A (posterior)
    matrix = np.diag([-1.0, -1.0, 1.0, 1.0])
    plane, spacing = oriented_axial_slice(array, matrix, (0.0, 0.0, 1.0))
    assert plane.shape == (4, 5) and spacing == (1.0, 1.0)
    # voxel i=0 is the most right (R = 0 > -4) -> column 0; j=0 is the most anterior -> row 0
    assert plane[0, 0] == 1
    matrix_ras = np.eye(4)  # i -> R, j -> A
    plane, _ = oriented_axial_slice(array, matrix_ras, (0.0, 0.0, 1.0))
    assert plane[-1, -1] == 1


def test_render_scene_figure_offscreen(tmp_path):
    try:
        window, backend = offscreen_render_window((64, 64))
        window.Finalize()
    except RuntimeError as exc:
        pytest.skip(f"offscreen rendering is not available here: {exc}")
    scene, _logics = mrml.create_headless_scene()
    shape = (40, 48, 44)
    k, j, i = np.indices(shape)
    r = np.sqrt(((k - 20) / 16.0) ** 2 + ((j - 24) / 19.0) ** 2 + ((i - 22) / 17.0) ** 2)
    labels = np.zeros(shape, np.uint8)
    labels[r < 1.0] = 3
    labels[(r >= 0.8) & (r < 1.0)] = 2
    t = np.sqrt((k - 20) ** 2 + (j - 28) ** 2 + (i - 26) ** 2)
    labels[t < 7] = 5
    labels[t < 4.5] = 6
    labels[t < 2.5] = 4
    matrix = np.diag([-1.0, -1.0, 1.0, 1.0])
    volumes = {}
    for n, modality in enumerate(("t1", "t1ce", "t2", "flair")):
        volumes[modality] = mrml.add_volume_from_array(scene, (labels * (n + 1) * 100).astype(np.float32), matrix,
                                                       modality)
    seg = mrml.segmentation_from_labels(scene, labels, volumes["t1"], "labels")
    path, used = render_scene_figure(seg, volumes, labels, tmp_path / "figure.png", size=(480, 220))
    from PIL import Image

    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape == (220, 480, 3)
    left, right = image[:, :200], image[:, 200:]
    assert len(np.unique(left.reshape(-1, 3), axis=0)) > 20, "the 3D panel is empty"
    assert (right == [255, 0, 0]).all(axis=2).any() or (right[..., 0] > 200).any()
    assert used in ("EGL", "OSMesa") or used
