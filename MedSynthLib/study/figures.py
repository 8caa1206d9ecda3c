"""The figures of the study report (matplotlib, Agg): Dice per arm, fidelity, montages, nearest cases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .segmenter import REGIONS

#: Display names of the modalities, in the order of a study case's image channels.
from ..schema.labels import MODALITY_TITLES  # noqa: E402  (the one definition)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_dice(report: dict[str, Any], path: Path) -> None:
    plt = _plt()
    seg = report["segmentation"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), sharey=True)
    rng = np.random.default_rng(0)
    for ax, region in zip(axes, REGIONS):
        arms = list(report["design"]["arms"])  # every scored arm, in the report's order, with its title
        data = [[seg["per_case"][arm][c][region]["dice"] for c in seg["cases"]] for arm in arms]
        ax.boxplot(data, widths=0.5, showmeans=True, showfliers=False)  # every case is drawn as a point
        for i, values in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.1, 0.1, len(values)), values, s=14, color="tab:blue", alpha=0.7, zorder=3)
        ax.set_xticks(range(1, len(arms) + 1), [report["design"]["arms"][a].split(".")[0] for a in arms], fontsize=7)
        ax.set_title(f"{region} Dice")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Dice on {len(seg['cases'])} held-out real cases per training arm")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figure_fidelity(report: dict[str, Any], path: Path) -> None:
    plt = _plt()
    s = report["fidelity"]["summary"]
    mods = list(MODALITY_TITLES)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, metric, label in zip(axes, ("ssim", "psnr", "mae"), ("SSIM", "PSNR (dB)", "MAE (z)")):
        x = np.arange(len(mods))
        series = [("GAN, brain", s["model"], "brain"), ("GAN, tumour", s["model"], "tumour"),
                  ("class-mean baseline, brain", s["class_mean_training"], "brain")]
        for k, (name, src, region) in enumerate(series):
            means = [src[m][region][metric]["mean"] or 0.0 for m in mods]
            stds = [src[m][region][metric]["std"] or 0.0 for m in mods]
            ax.bar(x + (k - 1) * 0.27, means, 0.27, yerr=stds, label=name, capsize=2)
        ax.set_xticks(x, [MODALITY_TITLES[m] for m in mods])
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Synthesis fidelity on the held-out cases (mean ± std)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figure_memorisation(report: dict[str, Any], path: Path) -> None:
    plt = _plt()
    memo = report["memorisation"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    groups = [("real pairs", [p["ncc"] for p in memo["real_pairs"]["pairs"]])]
    for kind in memo["synthetic"]["by_kind"]:
        groups.append((f"synthetic: {kind}", [e["ncc_nearest"] for e in memo["per_case"] if e["kind"] == kind]))
    rng = np.random.default_rng(0)
    for i, (name, values) in enumerate(groups):
        ax.scatter(values, i + rng.uniform(-0.15, 0.15, len(values)), s=16, alpha=0.8)
    if memo["threshold_max_real_pair"] is not None:
        ax.axvline(memo["threshold_max_real_pair"], color="red", ls="--", label="closest real pair")
        ax.legend(fontsize=8)
    ax.set_yticks(range(len(groups)), [g[0] for g in groups])
    ax.set_xlabel("NCC (real pairs: to each other; synthetic: to the most similar training case)")
    ax.set_title("Memorisation check")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figure_montage(study: Any, results: dict[str, Any], path: Path) -> str | None:
    """Real vs synthetic for the first held-out case of the first fold."""
    from ..synthesis.render import render_montage

    fold = results["folds"][0]
    case_id = fold["test"][0]
    real = study.real_case(case_id)
    synthetic = np.load(fold["fidelity"]["synthetic_images"][case_id])
    volumes = {}
    for m, (key, title) in enumerate(MODALITY_TITLES.items()):
        volumes[f"real {title}"] = real.images[m]
        volumes[f"synthetic {title}"] = synthetic[m]
    render_montage(volumes, real.labelmap.array, real.labelmap.grid, path,
                   title=f"{case_id} (held out, fold {fold['fold']}): real vs synthetic from its label map")
    return case_id


def figure_synthetic_examples(study: Any, results: dict[str, Any], path: Path) -> None:
    """One synthetic augmentation case per kind (fold 1): T1ce, FLAIR and labels through the tumour."""
    plt = _plt()
    from matplotlib.colors import ListedColormap

    from ..synthesis.render import label_colours

    fold = results["folds"][0]
    folder = Path(fold["synthetic"]["folder"])
    chosen: dict[str, dict[str, Any]] = {}
    for prov in fold["synthetic"]["provenance"]:
        chosen.setdefault(prov["kind"], prov)
    rows = list(chosen.values())
    fig, axes = plt.subplots(len(rows), 3, figsize=(8, 2.8 * len(rows)), squeeze=False)
    cmap = ListedColormap(label_colours())
    for r, prov in enumerate(rows):
        images = np.load(folder / f"{prov['name']}_images.npy").astype(np.float32)
        labels = np.load(folder / f"{prov['name']}_labels.npy")
        tumour = labels >= 4
        k = int(np.argwhere(tumour).mean(axis=0)[0]) if tumour.any() else labels.shape[0] // 2
        panels = [(images[1][k], "T1ce"), (images[3][k], "FLAIR"), (labels[k], "labels")]
        for c, (plane, title) in enumerate(panels):
            ax = axes[r, c]
            if title == "labels":
                ax.imshow(plane[::-1], cmap=cmap, vmin=0, vmax=6, interpolation="nearest")
            else:
                ax.imshow(plane[::-1], cmap="gray", vmin=-2.5, vmax=3.5, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title)
            if c == 0:
                ax.set_ylabel(f"{prov['kind']}\n(base: {prov['base']})", fontsize=8)
    fig.suptitle(f"Synthetic training cases of fold {fold['fold']}, one per edit kind (axial, z-scored)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
