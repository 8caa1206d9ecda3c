"""The dataset card of a generated dataset: ``README.md``, ``dataset_card.json`` and a figure.

It says what made the data (model and sha256, sampler config, seed, the command), what is in
it (counts per kind of case, the label values, the image grids), how its tumours compare with
the real sources (size, location, sub-region fractions), how faithful the model is (the
validation numbers in its config), and the privacy status of every case.  Built from the cases'
provenance files on disk.  The nnU-Net and MSD layouts also get a short README inside their
dataset folder, the folder users copy on (into ``nnUNet_raw``): the privacy verdict, the label
values and the grids, pointing to the full card beside it.
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
#: The BraTS releases' grid (SRI24 space): what BraTS pipelines usually assume every case is on.
BRATS_GRID = {"size": [240, 240, 155], "spacing": [1.0, 1.0, 1.0], "orientation": "LPS"}
#: Options of ``medsynth generate`` whose values are paths, with the placeholder the card shows: a folder or file
#: name can name a patient.
_PATH_OPTIONS = {"--labels-from": "DIR", "--output": "OUT", "-o": "OUT", "--edits": "CONFIG", "--cache": "DIR",
                 "--model": "MODEL_DIR"}
#: Options of ``medsynth generate`` that take one value that is not a path (an unknown option's value is hidden
#: when it looks like a path).
_VALUE_OPTIONS = ("-n", "--label-convention", "--layout", "--dataset-id", "--name", "--workers", "--seed",
                  "--appearance-spread", "--device", "--precision")


def card_command(argv: Sequence[str]) -> str:
    """The ``medsynth`` command as typed (``argv`` without the program name), every path a placeholder.

    Only the options the user gave appear, in the user's order; ``--command-line`` (internal) is left out.
    """
    words: list[str] = ["medsynth"]
    tokens = list(argv)
    i = 0

    def full(option: str) -> str:
        # argparse takes a unique prefix of a long option.
        if option.startswith("--"):
            matches = [o for o in (*_PATH_OPTIONS, *_VALUE_OPTIONS, "--command-line") if o.startswith(option)]
            if len(matches) == 1:
                return matches[0]
        return option

    def hidden(option: str, value: str) -> str:
        if option == "--model" and not _looks_like_path(value):
            return value  # a registered model's name
        return _PATH_OPTIONS[option]

    while i < len(tokens):
        token = tokens[i]
        i += 1
        name, eq, value = token.partition("=") if token.startswith("--") else (token, "", "")
        option = full(name)
        if option == "--command-line":
            i += 0 if eq else 1
            continue
        if option in _PATH_OPTIONS:
            if eq:
                words.append(f"{name}={hidden(option, value)}")
                continue
            words.append(name)
            count = 0
            # --labels-from takes several folders; the others one value.
            while i < len(tokens) and not tokens[i].startswith("-") and (count == 0 or option == "--labels-from"):
                words.append(hidden(option, tokens[i]))
                i += 1
                count += 1
            continue
        words.append(token if not _looks_like_path(value if eq else token) else
                     (f"{name}=PATH" if eq else "PATH"))
    return " ".join(words)


def _looks_like_path(value: str) -> bool:
    return bool(value) and ("/" in value or os.sep in value or Path(value).exists())


def describe_grid(grid: dict[str, Any], base: str) -> dict[str, Any]:
    """A case's grid as the card states it: size, voxel size, orientation code, space and whether it is BraTS's.

    ``base`` is the case's generation base: ``template`` puts it on the ICBM152 template's grid (MNI space); any
    other base keeps the source case's own grid.
    """
    import SimpleITK as sitk

    size = [int(v) for v in grid["size"]]
    spacing = [round(float(v), 3) for v in grid["spacing"]]
    orientation = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
        [float(v) for v in grid["direction"]])
    brats = size == BRATS_GRID["size"] and spacing == BRATS_GRID["spacing"] and orientation == BRATS_GRID["orientation"]
    if base == "template":
        space = "MNI (ICBM152 2009a template)"
    elif brats:
        space = "SRI24 (the BraTS grid)"
    else:
        space = "the source case's own"
    return {"size": size, "spacing": spacing, "orientation": orientation, "space": space, "brats_grid": brats}


def _cases(n: int) -> str:
    return f"{n} case" if n == 1 else f"{n} cases"


def _grid_text(grid: dict[str, Any]) -> str:
    spacing = grid["spacing"]
    voxel = f"{spacing[0]:g} mm" if len(set(spacing)) == 1 else " x ".join(f"{v:g}" for v in spacing) + " mm"
    return f"{' x '.join(str(v) for v in grid['size'])}, {voxel}, {grid['orientation']}, {grid['space']}"


def grid_summary(kind: str, records: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The grids of the cases with how many cases lie on each (most first), and the warnings they call for."""
    counts: Counter = Counter()
    for record in records:
        described = describe_grid(record["grid"], record["generation"]["base"])
        counts[tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in described.items())] += 1
    grids = [{**{k: list(v) if isinstance(v, tuple) else v for k, v in key}, "cases": n}
             for key, n in counts.most_common()]
    warnings = []
    if len(grids) > 1:
        warnings.append(f"The cases lie on {len(grids)} grids ("
                        + "; ".join(f"{_grid_text(g)}: {_cases(g['cases'])}" for g in grids)
                        + "): a pipeline that assumes one image shape, orientation or space for every case must "
                          "resample them first.")
    off_grid = sum(g["cases"] for g in grids if not g["brats_grid"])
    if kind.startswith("brats") and off_grid:
        warnings.append(f"Layout {kind}, but {off_grid} of {len(records)} cases are not on the BraTS grid "
                        "(240 x 240 x 155, 1 mm, LPS, SRI24 space), which BraTS pipelines often assume: resample "
                        "or register them before such a pipeline.")
    return grids, warnings


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
    grids, grid_warnings = grid_summary(layout.kind, records)
    card = {
        "kind": "medsynth-synthetic-dataset",
        "synthetic": True,
        "name": spec["name"],
        "layout": layout.kind,
        # The BraTS layouts have no dataset folder: one folder per case in the output folder.
        "dataset_folder": layout.dataset_dir or None,
        "case_folders": layout.case_folders,
        "label_values": layout.label_table(),
        "grids": grids,
        "grid_warnings": grid_warnings,
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
    _write_text(out / CARD_README, _readme(card))
    if layout.dataset_dir:
        # The dataset folder is what users copy (into nnUNet_raw): the verdict and the label values go with it.
        _write_text(out / layout.dataset_dir / CARD_README, _folder_readme(card))
    return card


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # torchrun ranks may both write it
    tmp.write_text(text)
    tmp.replace(path)


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


def privacy_verdict(counts: dict[str, Any], where: str = "see Privacy below") -> str:
    """The dataset's privacy in one sentence, first in its README: synthetic images need not be anonymous."""
    cases, anonymous = counts["cases"], counts["anonymous"]
    if anonymous == cases:
        return ("**Synthetic images, anonymous**: every case is a parametric tumour in the template brain, "
                "nobody's anatomy or tumour.")
    return (f"**Synthetic images, NOT anonymous**: {cases - anonymous} of {cases} cases carry a real patient's "
            f"anatomy or tumour, which can identify that patient ({where}).")


def _layout_line(card: dict[str, Any]) -> str:
    if card.get("dataset_folder"):
        return f"- Layout: `{card['layout']}` (folder `{card['dataset_folder']}`)"
    pattern = card.get("case_folders") or ""
    first = pattern.replace("NNNNN", "00000")
    return f"- Layout: `{card['layout']}` (one folder per case in this folder: `{first}`, ...)"


def _label_section(card: dict[str, Any]) -> list[str]:
    table = card.get("label_values")
    if not table:
        return []
    lines = ["## Label values", "",
             f"Tumour labels of the segmentations ({table['convention']}); `label_values` in `dataset_card.json`"
             + (" and in `dataset.json`" if card["layout"] in ("nnunet", "msd") else "") + ".", ""]
    if card["layout"] == "nnunet":
        lines += ["nnU-Net trains on the regions of `dataset.json` (whole tumour 1, 2, 3; tumour core 2, 3; "
                  "enhancing tumour 3); its predictions, written with `regions_class_order` [1, 2, 3], hold the "
                  "values below.", ""]
    lines += ["| value | class | BraTS 2021 value | BraTS 2023 value |", "|---|---|---|---|"]
    for value, short in table["values"].items():
        name = f"{short} ({table['classes'][short].lower()})" if short in table["classes"] else short
        lines.append(f"| {value} | {name} | {table['to_brats2021'][value]} | {table['to_brats2023'][value]} |")
    return lines + [""]


def _grid_section(card: dict[str, Any]) -> list[str]:
    if "grids" not in card:
        return []
    lines = ["## Image grids", "",
             "Every case's images and segmentation share one grid: the source case's own, or the ICBM152 template's "
             "for a case drawn in the template.", "",
             "| size (voxels) | voxel size (mm) | orientation | space | cases |", "|---|---|---|---|---|"]
    for grid in card["grids"]:
        lines.append(f"| {' x '.join(str(v) for v in grid['size'])} | "
                     f"{' x '.join(f'{v:g}' for v in grid['spacing'])} | {grid['orientation']} | {grid['space']} | "
                     f"{grid['cases']} |")
    lines.append("")
    lines += [f"**Warning**: {warning}\n" for warning in card["grid_warnings"]]
    return lines


def _folder_readme(card: dict[str, Any]) -> str:
    """The README inside the dataset folder: what travels with it when it is copied on its own."""
    counts = card["counts"]
    lines = [
        f"# {card['name']}: a synthetic brain-tumour MRI dataset",
        "",
        privacy_verdict(counts, "each case's privacy record is in the dataset card"),
        "",
        f"- Generated by MedSynth, model `{card['model']['name']}`; layout `{card['layout']}`; "
        f"{_cases(counts['cases'])}, {counts['anonymous']} anonymous.",
        f"- Privacy rule: {card['privacy_rule']}.",
        "- The full dataset card (every case's privacy record, the tumour statistics, the model, seed and command) "
        f"is `{CARD_README}` and `{CARD_JSON}` in the folder this one was generated in, with each case's provenance "
        "in `provenance/`: keep them with this folder wherever it is copied.",
        "",
        *_label_section(card),
        *_grid_section(card),
    ]
    return "\n".join(lines).rstrip("\n") + "\n"


def _readme(card: dict[str, Any]) -> str:
    gen, real = card["tumours"]["generated"], card["tumours"]["real_sources"]
    fid = card["model"]["fidelity"] or {}
    lines = [
        f"# {card['name']}: a synthetic brain-tumour MRI dataset",
        "",
        f"{privacy_verdict(card['counts'])} T1, T1ce, T2 and FLAIR generated by MedSynth from a label map "
        "(brain anatomy + tumour), with the tumour annotation the images were generated from.",
        "",
        _layout_line(card),
        f"- Model: `{card['model']['name']}`, weights sha256 `{card['model']['sha256']}`",
        f"- Seed: {card['seed']}; appearance spread: {card['appearance_spread']:g}; "
        f"anonymous cases only: {'yes' if card['anonymous_only'] else 'no'}",
        f"- Command: `{card['command']}`" if card["command"] else "- Command: (called from Python)",
        f"- Cases: {card['counts']['cases']} ({', '.join(f'{k} {v}' for k, v in card['counts']['by_kind'].items())})",
        f"- Sources: {card['sources']['real_cases']} real cases, {card['sources']['tumour_label_maps']} tumour "
        f"label maps, template: {'yes' if card['sources']['template'] else 'no'}",
        "",
        *_label_section(card),
        *_grid_section(card),
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
