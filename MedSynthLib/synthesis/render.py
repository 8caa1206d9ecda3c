"""PNG montages: volumes in three planes through a point, with the label overlay."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..schema.grid import Grid
from ..schema.labels import LABEL_INFO, NUM_CLASSES, Label, tumour_mask
from ..schema.volume_io import _tmp_sibling


def _to_lps_axes(array: np.ndarray, grid: Grid) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reorient so array axes run (S, P, L) = (k, j, i) in LPS: radiological display."""
    image = sitk.DICOMOrient(grid.image(array), "LPS")
    return sitk.GetArrayFromImage(image), image.GetSpacing()


def label_colours() -> np.ndarray:
    """RGBA lookup table (NUM_CLASSES x 4) for label overlays; background transparent."""
    lut = np.zeros((NUM_CLASSES, 4))
    for label, info in LABEL_INFO.items():
        lut[label, :3] = info.color
        lut[label, 3] = 0.0 if label == Label.BACKGROUND else 1.0
    return lut


def render_montage(volumes: dict[str, np.ndarray], labels: np.ndarray, grid: Grid,
                   path: str | os.PathLike[str], *, centre_kji: tuple[int, int, int] | None = None,
                   overlay_alpha: float = 0.35, title: str | None = None) -> Path:
    """Write a PNG: one row per volume (plus the label map), axial/coronal/sagittal columns.

    Args:
        volumes: name -> (k, j, i) intensity array on ``grid``.
        labels: (k, j, i) MedSynth label map; outlined over every volume.
        grid: geometry, used to orient the views (radiological convention) and aspect.
        path: the PNG file (written atomically).
        centre_kji: the voxel the three planes pass through (default: tumour centre,
            else the brain centre).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    if centre_kji is None:
        focus = tumour_mask(labels)
        focus = focus if focus.any() else labels > 0
        centre_kji = tuple(int(round(c)) for c in np.argwhere(focus).mean(axis=0)) if focus.any() else \
            tuple(s // 2 for s in labels.shape)
    marker = np.zeros(labels.shape, np.uint8)
    marker[centre_kji] = 1
    marker_lps, _ = _to_lps_axes(marker, grid)
    k, j, i = (int(v[0]) for v in np.nonzero(marker_lps))
    labels_lps, spacing = _to_lps_axes(labels, grid)
    sx, sy, sz = spacing
    cmap = ListedColormap(label_colours())

    def planes(array: np.ndarray) -> list[tuple[np.ndarray, float]]:
        # Axial: anterior up, patient right on screen left; coronal/sagittal: superior up.
        return [(array[k], sy / sx), (array[:, j, :][::-1], sz / sx), (array[:, :, i][::-1], sz / sy)]

    rows = list(volumes.items()) + [("labels", None)]
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    label_planes = planes(labels_lps)
    for row, (name, volume) in enumerate(rows):
        if volume is not None:
            vol_lps, _ = _to_lps_axes(volume.astype(np.float32), grid)
            inside = vol_lps[labels_lps > 0]
            vmax = float(np.percentile(inside, 99.5)) if inside.size else float(vol_lps.max() or 1.0)
        for col, ((plane, aspect), (lab, _)) in enumerate(zip(planes(vol_lps) if volume is not None else label_planes,
                                                               label_planes)):
            ax = axes[row, col]
            if volume is not None:
                ax.imshow(plane, cmap="gray", vmin=0, vmax=vmax, aspect=aspect, interpolation="nearest")
                # Tumour sub-regions as outlines, so the synthetic tumour itself stays visible.
                for value in (Label.NCR, Label.ED, Label.ET):
                    if (lab == value).any():
                        ax.contour((lab == value).astype(float), levels=[0.5], colors=[LABEL_INFO[value].color],
                                   linewidths=0.8, alpha=min(1.0, 2 * overlay_alpha + 0.2))
            else:
                ax.imshow(lab, cmap=cmap, vmin=0, vmax=NUM_CLASSES - 1, aspect=aspect, interpolation="nearest")
                ax.set_facecolor("black")
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(name)
            if row == 0:
                ax.set_title(("axial", "coronal", "sagittal")[col])
    handles = [plt.Rectangle((0, 0), 1, 1, color=LABEL_INFO[lab].color) for lab in Label if lab != Label.BACKGROUND]
    fig.legend(handles, [LABEL_INFO[lab].short_name for lab in Label if lab != Label.BACKGROUND],
               loc="lower center", ncol=6, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.04, 1, 0.97 if title else 1))
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        fig.savefig(tmp, format="png", dpi=100, facecolor="white")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
