"""The dataset card of a generated dataset: ``README.md``, ``dataset_card.json`` and a figure.

It says what made the data (model and sha256, sampler config, seed, the command), what is in
it (counts per kind of case), how its tumours compare with the real sources (size, location,
sub-region fractions), how faithful the model is (the validation numbers in its config), and
the privacy status of every case.  Built from the cases' provenance files on disk.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .sources import Source

CARD_JSON = "dataset_card.json"
CARD_README = "README.md"
CARD_FIGURE = "dataset_card.png"


def _quantiles(values: Sequence[float]) -> dict[str, float] | None:
    if not len(values):
        return None
    q = np.percentile(np.asarray(values, float), [5, 25, 50, 75, 95])
    return {"n": len(values), "mean": round(float(np.mean(values)), 3),
            **{f"p{p}": round(float(v), 3) for p, v in zip((5, 25, 50, 75, 95), q)}}


def summarise(stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Distribution summary of tumour statistics (see :func:`.sources.tumour_stats`)."""
    with_tumour = [s for s in stats if s and s["voxels"]["WT"]]
    located = [s["relative_location"] for s in with_tumour if s.get("relative_location")]
    out: dict[str, Any] = {
        "with_tumour": len(with_tumour),
        "whole_tumour_ml": _quantiles([s["volume_ml"]["WT"] for s in with_tumour]),
        "tumour_core_ml": _quantiles([s["volume_ml"]["TC"] for s in with_tumour]),
        "fractions": {k: _quantiles([s["fractions"][k] for s in with_tumour]) for k in ("NCR", "ED", "ET")},
        "relative_location": None,
    }
    if located:
        loc = np.asarray(located, float)
        out["relative_location"] = {
            "mean_RAS": [round(float(v), 3) for v in loc.mean(0)], "std_RAS": [round(float(v), 3) for v in loc.std(0)],
            # Relative R coordinate above 0.5: the tumour centre lies in the right half of the brain box.
            "right_hemisphere_share": round(float(np.mean(loc[:, 0] > 0.5)), 3)}
    return out


def _fidelity(config: dict[str, Any]) -> dict[str, Any] | None:
    validation = config.get("validation")
    if not isinstance(validation, dict):
        return None
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in validation.items()
            if k not in ("per_case", "case_sha256")}


def _figure(path: Path, generated: list[dict[str, Any]], real: list[dict[str, Any]], kinds: Counter) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen = [s for s in generated if s["voxels"]["WT"]]
    rea = [s for s in real if s and s["voxels"]["WT"]]
    fig, axes = plt.subplots(2, 2, figsize=(10, 8))
    ax = axes[0, 0]
    bins = np.linspace(0, max([s["volume_ml"]["WT"] for s in gen + rea] + [1.0]), 20)
    ax.hist([s["volume_ml"]["WT"] for s in rea], bins=bins, density=True, alpha=0.5, label=f"real (n={len(rea)})")
    ax.hist([s["volume_ml"]["WT"] for s in gen], bins=bins, density=True, alpha=0.5,
            label=f"generated (n={len(gen)})")
    ax.set_xlabel("whole tumour volume (ml)")
    ax.set_ylabel("density")
    ax.legend()
    ax = axes[0, 1]
    data, labels = [], []
    for key in ("NCR", "ED", "ET"):
        data += [[s["fractions"][key] for s in rea], [s["fractions"][key] for s in gen]]
        labels += [f"{key}\nreal", f"{key}\ngen."]
    ax.boxplot([d if d else [np.nan] for d in data])
    ax.set_xticks(range(1, len(labels) + 1), labels)
    ax.set_ylabel("fraction of the whole tumour")
    ax = axes[1, 0]
    for name, group in (("real", rea), ("generated", gen)):
        loc = np.asarray([s["relative_location"] for s in group if s.get("relative_location")], float)
        if loc.size:
            ax.scatter(loc[:, 0], loc[:, 2], s=12, alpha=0.6, label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("tumour centre, relative R position in the brain box")
    ax.set_ylabel("relative S position")
    ax.legend()
    ax = axes[1, 1]
    names = sorted(kinds)
    ax.bar(names, [kinds[k] for k in names])
    ax.set_ylabel("cases")
    ax.set_title("kind of case")
    fig.suptitle("Generated tumours against the real sources")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")  # torchrun ranks may both write it
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)


def write_card(out: Path, layout: Any, spec: dict[str, Any], sources: Sequence[Source],
               records: Sequence[dict[str, Any]], command: str = "") -> dict[str, Any]:
    """Write the card files into ``out``; returns the JSON card."""
    from ..schema.volume_io import write_json
    from ..synthesis.models import resolve_model

    try:
        model_config = resolve_model(spec["model"]["name"]).config
    except Exception:  # noqa: BLE001 - the card still says which model, without its fidelity
        model_config = {}
    kinds = Counter(r["generation"]["kind"] for r in records)
    real_stats = [s.stats for s in sources if s.has_tumour and s.stats]
    generated_stats = [r["tumour"] for r in records]
    privacy_rows = [{"case_id": r["case_id"], "kind": r["generation"]["kind"], "base": r["generation"]["base"],
                     "tumour_source": r["generation"]["tumour_source"], **r["privacy"]} for r in records]
    counts = {
        "cases": len(records),
        "by_kind": dict(sorted(kinds.items())),
        "anonymous": sum(1 for p in privacy_rows if p["anonymous"]),
        "derived_from_patient": sum(1 for p in privacy_rows if p["derived_from_patient"]),
        "patients_own_tumour": sum(1 for p in privacy_rows if p["patients_own_tumour"]),
    }
    card = {
        "kind": "medsynth-synthetic-dataset",
        "synthetic": True,
        "name": spec["name"],
        "layout": layout.kind,
        "dataset_folder": layout.dataset_dir or ".",
        "model": {"name": spec["model"]["name"], "sha256": spec["model"]["sha256"],
                  "fidelity": _fidelity(model_config)},
        "sampler_config": spec["config"],
        "seed": spec["seed"],
        "appearance_spread": spec.get("appearance_spread", 1.0),
        "anonymous_only": spec["anonymous"],
        "command": command,
        "counts": counts,
        "sources": {"real_cases": sum(1 for s in sources if s.kind == "case"),
                    "tumour_label_maps": sum(1 for s in sources if s.kind == "tumour"),
                    "template": any(s.kind == "template" for s in sources),
                    "ids": [s.source_id for s in sources]},
        "tumours": {"generated": summarise(generated_stats), "real_sources": summarise(real_stats)},
        "privacy_rule": ("anonymous = a parametric tumour in the template brain; never a patient's brain (its "
                         "outline and anatomy identify the patient) and never a real tumour (its shape identifies "
                         "its patient wherever it is placed)"),
        "privacy": privacy_rows,
        "figure": CARD_FIGURE,
    }
    _figure(out / CARD_FIGURE, generated_stats, real_stats, kinds)
    write_json(card, out / CARD_JSON, overwrite=True)
    tmp = out / f".{CARD_README}.{os.getpid()}.tmp"
    tmp.write_text(_readme(card))
    tmp.replace(out / CARD_README)
    return card


def _fmt_q(q: dict[str, float] | None) -> str:
    return "—" if not q else f"{q['p50']:g} [{q['p5']:g}–{q['p95']:g}]"


def _fmt_dice(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _fmt_location(location: dict[str, Any] | None, key: str) -> str:
    """One set's tumour-centre value (``mean_RAS`` or ``right_hemisphere_share``); "—" when it has none."""
    if not location:
        return "—"
    value = location[key]
    return f"{value:g}" if isinstance(value, float) else str(value)


def privacy_verdict(counts: dict[str, Any]) -> str:
    """The dataset's privacy in one sentence, first in its README: synthetic images need not be anonymous."""
    cases, anonymous = counts["cases"], counts["anonymous"]
    if anonymous == cases:
        return ("**Synthetic images, anonymous**: every case is a parametric tumour in the template brain, "
                "nobody's anatomy or tumour.")
    return (f"**Synthetic images, NOT anonymous**: {cases - anonymous} of {cases} cases carry a real patient's "
            "anatomy or tumour, which can identify that patient (see Privacy below).")


def _readme(card: dict[str, Any]) -> str:
    gen, real = card["tumours"]["generated"], card["tumours"]["real_sources"]
    fid = card["model"]["fidelity"] or {}
    lines = [
        f"# {card['name']}: a synthetic brain-tumour MRI dataset",
        "",
        f"{privacy_verdict(card['counts'])} T1, T1ce, T2 and FLAIR generated by MedSynth from a label map "
        "(brain anatomy + tumour), with the tumour annotation the images were generated from.",
        "",
        f"- Layout: `{card['layout']}` (folder `{card['dataset_folder']}`)",
        f"- Model: `{card['model']['name']}`, weights sha256 `{card['model']['sha256']}`",
        f"- Seed: {card['seed']}; appearance spread: {card['appearance_spread']:g}; "
        f"anonymous cases only: {'yes' if card['anonymous_only'] else 'no'}",
        f"- Command: `{card['command']}`" if card["command"] else "- Command: (called from Python)",
        f"- Cases: {card['counts']['cases']} ({', '.join(f'{k} {v}' for k, v in card['counts']['by_kind'].items())})",
        f"- Sources: {card['sources']['real_cases']} real cases, {card['sources']['tumour_label_maps']} tumour "
        f"label maps, template: {'yes' if card['sources']['template'] else 'no'}",
        "",
        "## Model fidelity (its validation, from the model's config)",
        "",
        ("brain SSIM {brain_ssim}, PSNR {brain_psnr} dB; tumour SSIM {tumour_ssim}, PSNR {tumour_psnr} dB".format(
            **{k: fid.get(k, "—") for k in ("brain_ssim", "brain_psnr", "tumour_ssim", "tumour_psnr")})
         # The shipped models' configs hold an empty record: their held-out validation is in the model card.
         if fid else "The model's config records no held-out validation of its own; the shipped models' held-out "
                     "validation, where measured, is in the model card, `docs/model_card.md`."),
        "",
        "## Tumours: generated against the real sources",
        "",
        "| | generated | real sources |",
        "|---|---|---|",
        f"| cases with a tumour | {gen['with_tumour']} | {real['with_tumour']} |",
        f"| whole tumour ml, median [5–95 %] | {_fmt_q(gen['whole_tumour_ml'])} | {_fmt_q(real['whole_tumour_ml'])} |",
        f"| tumour core ml | {_fmt_q(gen['tumour_core_ml'])} | {_fmt_q(real['tumour_core_ml'])} |",
    ]
    for key in ("NCR", "ED", "ET"):
        lines.append(f"| {key} fraction of the tumour | {_fmt_q(gen['fractions'][key])} | "
                     f"{_fmt_q(real['fractions'][key])} |")
    # One row per measure, each set's value under its own column, as in the rows above.
    gen_loc, real_loc = gen["relative_location"], real["relative_location"]
    if gen_loc or real_loc:
        for label, key in (("tumour centre, mean relative RAS in the brain box", "mean_RAS"),
                           ("tumour centre in the right half of the brain box, share of tumours",
                            "right_hemisphere_share")):
            lines.append(f"| {label} | {_fmt_location(gen_loc, key)} | {_fmt_location(real_loc, key)} |")
    lines += [
        "",
        f"![tumour size, sub-regions and location]({CARD_FIGURE})",
        "",
        "## Privacy",
        "",
        f"Rule: {card['privacy_rule']}.",
        f"{card['counts']['anonymous']} of {card['counts']['cases']} cases are anonymous by this rule; "
        f"{card['counts']['derived_from_patient']} are derived from a real patient's label map (brain or tumour); "
        f"{card['counts']['patients_own_tumour']} keep a patient's own tumour in that patient's brain.",
        "Each row is the case label map's own privacy record, measured edit by edit as the case was made "
        "(the same record `medsynth export` reads): whose anatomy it is, the brain-mask Dice to that patient, "
        "the tumour's Dice to that patient's own tumour in place (an upper bound after several edits), where "
        "the tumour came from, and the verdict with its reason (all in `dataset_card.json`, `privacy`).",
        "",
        "| case | kind | anatomy | tumour | brain Dice to patient | tumour Dice to patient's own | anonymous |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in card["privacy"]:
        lines.append(f"| {row['case_id']} | {row['kind']} | {row['anatomy']} | {row['tumour_origin']} | "
                     f"{_fmt_dice(row['brain_dice_to_source'])} | {_fmt_dice(row['tumour_dice_to_source'])} | "
                     f"{'yes' if row['anonymous'] else 'no: ' + row['reason']} |")
    return "\n".join(lines) + "\n"
