"""Synthesis fidelity of a model on real cases (``medsynth evaluate``).

For each case: its real label map -> synthetic images, compared with its real
images per modality inside the brain (any real modality > 0) and inside the
tumour, with the metrics of :mod:`MedSynthLib.evaluation.metrics`.  Two reference points
are computed on the same cases: every label class painted with its mean
z-scored intensity (from the reference cases given, or, as an oracle, from the
evaluated case itself).  Beside the metrics: the radiological contrast rules
(:mod:`MedSynthLib.evaluation.image_checks`) on the synthetic and on the real
images of each case, and the checkerboard ratio (period-2 power, synthetic over
real) per modality.

Each class's median brightness is reported in two frames. Z-scored on its own, as the
metrics and the contrast rules read it, a synthetic image that lacks the real one's
texture, noise and bias field has a smaller spread over the brain and is stretched
further: every class moves away from the brain's mean even where the network painted it
at the real level. Placed in the patient's own frame instead (the network's output
mapped to scanner units by the case's own normaliser, fitted as training fits each
case, then z-scored with the real image's brain mean and spread), each class median is
compared with the real one at the same scale: that difference is the class signal the
model got wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..cases.readers import MODALITIES, read_case
from ..schema.labels import NUM_CLASSES, Label, brain_mask, tumour_mask
from ..synthesis.normalize import (REFERENCE_TISSUE_WORDS, fit_case_normalizers, normalization_of,
                                   reference_tissue, zscore)
from .image_checks import check_contrast_rules, checkerboard_ratio_to, class_medians, nyquist_power
from .metrics import class_mean_baseline, fidelity


def real_brain_mask(images: dict[str, np.ndarray]) -> np.ndarray:
    mask = np.zeros(next(iter(images.values())).shape, bool)
    for array in images.values():
        mask |= array > 0
    return mask


def class_means(case_dirs: list[Path], labels_for: Callable[[Path], np.ndarray],
                reader: Callable[[Path], Any] | None = None,
                step: Callable[[str], None] | None = None) -> dict[str, dict[int, float]]:
    """Mean z-scored intensity of every label class, per modality, over reference cases (read with ``reader``;
    ``step`` is called with each case's name once it is counted)."""
    sums = {m: np.zeros(NUM_CLASSES) for m in MODALITIES}
    counts = {m: np.zeros(NUM_CLASSES) for m in MODALITIES}
    for folder in case_dirs:
        case = reader(folder) if reader is not None else read_case(folder)
        labels = labels_for(folder)
        brain = real_brain_mask(case.images)
        for m in MODALITIES:
            z = zscore(case.images[m], brain)
            sums[m] += np.bincount(labels[brain], weights=z[brain], minlength=NUM_CLASSES)
            counts[m] += np.bincount(labels[brain], minlength=NUM_CLASSES)
        if step is not None:
            step(f"{Path(folder).name}: class means")
    return {m: {v: float(sums[m][v] / counts[m][v]) for v in range(NUM_CLASSES) if counts[m][v]}
            for m in MODALITIES}


def _summary(per_case: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for region in ("brain", "tumour"):
        for metric in ("ssim", "psnr", "mae"):
            values = [c[m][region][metric] for c in per_case for m in MODALITIES if region in c[m]]
            if values:
                out[f"{region}_{metric}"] = float(np.mean(values))
    return out


def _rules_summary(cases: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per rule: on how many cases it held for the synthetic and for the real images (of those checked)."""
    out: dict[str, dict[str, int]] = {}
    for case in cases:
        for source in ("synthetic", "real"):
            for rule in case["contrast_rules"][source]:
                counts = out.setdefault(rule["rule"], {"checked": 0, "synthetic_passed": 0, "real_passed": 0})
                if rule["passed"] is None:
                    continue
                if source == "synthetic":
                    counts["checked"] += 1
                counts[f"{source}_passed"] += int(rule["passed"])
    return out


def named_class_medians(image: np.ndarray, labels: np.ndarray, brain: np.ndarray,
                        frame: np.ndarray | None = None) -> dict[str, float]:
    """:func:`~MedSynthLib.evaluation.image_checks.class_medians` by class name, rounded as reports record them."""
    return {Label(value).name: round(z, 4)
            for value, z in sorted(class_medians(image, labels, brain, frame=frame).items())}


def frame_without_reference(labels: np.ndarray, modalities: tuple[str, ...],
                            model_normalizers: dict[str, Any]) -> str | None:
    """The first normalisation kind of the model's contrasts whose reference tissue the label map lacks (e.g. no
    grey or white matter for the tissue z-score): the case then has no normaliser of that kind, so no patient's
    frame (:func:`in_patient_frame`); ``None`` where every kind has its tissue."""
    kinds = {normalization_of(model_normalizers[m]) for m in modalities}
    return next((kind for kind in sorted(kinds) if not reference_tissue(labels, kind).any()), None)


def in_patient_frame(real: dict[str, np.ndarray], normalized: np.ndarray, modalities: tuple[str, ...],
                     model_normalizers: dict[str, Any], labels: np.ndarray) -> dict[str, np.ndarray]:
    """The network's output mapped to the real case's scanner units by the case's own normaliser, of the model's
    kind and fitted as training fits each case (module docstring); 0 outside the label map's brain.

    Args:
        real: modality -> the case's real image in scanner units.
        normalized: (len(modalities), k, j, i) the network's output.
        model_normalizers: the model's, per modality (their kind says how a case is normalised).
    """
    brain = brain_mask(labels)
    placed = {}
    for c, m in enumerate(modalities):
        own = fit_case_normalizers({m: real[m]}, labels, normalization_of(model_normalizers[m]))[m]
        placed[m] = own.inverse(normalized[c], brain)
    return placed


def class_signal(real: dict[str, np.ndarray], synthetic: dict[str, np.ndarray], normalized: np.ndarray,
                 modalities: tuple[str, ...], model_normalizers: dict[str, Any], labels: np.ndarray,
                 brain: np.ndarray, real_medians: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per contrast: each class's median z in the real image, in the synthetic image z-scored on its own, and in
    the synthetic image placed in the patient's frame (module docstring); and the synthetic image's spread over the
    brain in that frame as a fraction of the real one's (below 1: what its own z-score stretches).

    Args:
        real, synthetic: modality -> image in scanner units (the synthetic one from the model's own ranges).
        normalized: (len(modalities), k, j, i) the network's output for ``synthetic``.
        model_normalizers: the model's, per modality (their kind says how a case is normalised).
        real_medians: the real images' class medians (:func:`named_class_medians`), computed once per case.
    """
    # The case's own normaliser fixes the frame; without its reference tissue the case has none, and only the
    # own-z-score medians are reported.
    undefined = frame_without_reference(labels, modalities, model_normalizers)
    placed_images = {} if undefined else in_patient_frame(real, normalized, modalities, model_normalizers, labels)
    out: dict[str, Any] = {}
    for m in modalities:
        synthetic_own = named_class_medians(synthetic[m], labels, brain)
        if undefined:
            spread, in_frame = None, {}
        else:
            placed = placed_images[m]
            spread = round(float(placed[brain].std() / (real[m][brain].astype(np.float64).std() or 1.0)), 4)
            in_frame = named_class_medians(placed, labels, brain, frame=real[m])
        out[m] = {"brain_spread_ratio": spread,
                  "classes": {name: {"real": z, "synthetic": synthetic_own.get(name),
                                     "synthetic_in_patient_frame": in_frame.get(name)}
                              for name, z in real_medians[m].items()}}
        if undefined:
            out[m]["patient_frame"] = (f"undefined: the label map has no {REFERENCE_TISSUE_WORDS[undefined]}, "
                                       f"which the case's {undefined} normaliser is fitted on")
    return out


def spread_text(ratio: float | None) -> str:
    """A class signal's brain spread ratio as reports print it ("n/a" where no case had a patient's frame)."""
    return "n/a" if ratio is None else f"{ratio:.2f}"


def class_signal_summary(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over cases, per contrast and class, of each frame's synthetic-minus-real median (and the spread)."""
    out: dict[str, Any] = {}
    for m in MODALITIES:
        per_case = [c["class_signal"][m] for c in cases if m in c.get("class_signal", {})]
        if not per_case:
            continue
        classes: dict[str, Any] = {}
        for name in [label.name for label in Label if label != Label.BACKGROUND]:
            rows = [p["classes"][name] for p in per_case if name in p["classes"]
                    and p["classes"][name]["synthetic"] is not None
                    and p["classes"][name]["synthetic_in_patient_frame"] is not None]
            if not rows:
                continue
            own = [r["synthetic"] - r["real"] for r in rows]
            framed = [r["synthetic_in_patient_frame"] - r["real"] for r in rows]
            classes[name] = {"cases": len(rows), "real": float(np.mean([r["real"] for r in rows])),
                             "synthetic_minus_real": float(np.mean(own)),
                             "patient_frame_minus_real": float(np.mean(framed)),
                             "patient_frame_abs_difference": float(np.mean(np.abs(framed)))}
        spreads = [p["brain_spread_ratio"] for p in per_case if p["brain_spread_ratio"] is not None]
        out[m] = {"brain_spread_ratio": float(np.mean(spreads)) if spreads else None, "classes": classes}
    return out


def _model_free_scores(images: dict[str, np.ndarray], labels: np.ndarray, brain: np.ndarray,
                       regions: dict[str, np.ndarray], means: dict[str, dict[int, float]] | None,
                       done: Callable[[str], None], name: str) -> dict[str, Any]:
    """What a case scores without any model: the contrast rules on its real images, their period-2 power (the
    checkerboard ratio's reference), and the fidelity of painting each class with its mean (the case's own, the
    oracle, and the reference cases'); ``done`` is told when each baseline is scored."""
    out = {"real_contrast_rules": check_contrast_rules(images, labels, brain),
           "real_class_medians": {m: named_class_medians(images[m], labels, brain) for m in MODALITIES},
           "real_period2_power": {m: nyquist_power(images[m], brain) for m in MODALITIES},
           "class_mean_oracle": {m: fidelity(images[m], class_mean_baseline(labels, images[m], brain), brain, regions)
                                 for m in MODALITIES}}
    done(f"{name}: oracle")
    if means is not None:
        out["class_mean_training"] = {
            m: fidelity(images[m], class_mean_baseline(labels, images[m], brain, means[m]), brain, regions)
            for m in MODALITIES}
        done(f"{name}: training")
    return out


def trained_on(model: Any, case: Any) -> bool:
    """Whether ``model``'s training record lists ``case``'s files (the content hash training keeps per case).

    A model trained before the prepared-case format last changed keeps hashes of that format: the case is looked
    for under each known scheme (:func:`~MedSynthLib.cases.case_key.in_training_record`).  A shared model's record
    drops the hashes (:func:`~MedSynthLib.synthesis.models.share_model`): then ``False``, as nothing can be told.
    """
    from ..cases.case_key import in_training_record

    record = (getattr(model, "config", None) or {}).get("training") or {}
    recorded = (record.get("data") or {}).get("case_sha256") or []
    return in_training_record(case, recorded)


def refuse_repeated_cases(case_dirs: list[Path], reference_dirs: list[Path], key_of: Callable[[Path], str]) -> None:
    """Refuse a case given twice, or a held-out case also among the reference cases.

    Cases are told apart by ``key_of`` (their files' content hash), so a copy or a link of a case is the same case.
    Given twice, a held-out case is scored twice and weighs double in every mean of the report (a reference case, in
    the class means); among the references, the class-mean 'training' baseline is fitted on the case it scores,
    which makes it the oracle under another name.

    Raises:
        InputError: naming the later folder and the one it repeats.
    """
    from ..schema.errors import InputError

    held_out: dict[str, Path] = {}
    references: dict[str, Path] = {}
    for folder in case_dirs:
        key = key_of(folder)
        if key in held_out:
            raise InputError(folder, f"is the held-out case {held_out[key]} given twice (the same files): it would be "
                                     "scored twice and weigh double in the report; give each case once")
        held_out[key] = folder
    for folder in reference_dirs:
        key = key_of(folder)
        if key in held_out:
            raise InputError(folder, f"is the held-out case {held_out[key]} (the same files) given as a reference "
                                     "case too: the class-mean training baseline would be fitted on the case it "
                                     "scores; give reference cases other than the held-out ones")
        if key in references:
            raise InputError(folder, f"is the reference case {references[key]} given twice (the same files): it "
                                     "would weigh double in the class means; give each case once")
        references[key] = folder


#: The parts of one case's evaluation :func:`evaluate` reports to its ``step`` callback, in order; ``training``
#: only with reference cases.  Most of a case's time is its SSIMs: four per score (model, oracle, training).
CASE_STEPS = ("read", "synthesis", "model scores", "oracle", "training", "checks")


def evaluation_steps(cases: int, references: int) -> int:
    """How many times :func:`evaluate` calls ``step`` for ``cases`` held-out and ``references`` reference cases."""
    return references + cases * (len(CASE_STEPS) - (0 if references else 1))


def evaluate(engine: Any, case_dirs: list[Path], labels_for: Callable[[Path], np.ndarray],
             reference_dirs: list[Path] | None = None,
             reader: Callable[[Path], Any] | None = None,
             progress: Callable[[str], None] | None = None,
             shared: dict[str, Any] | None = None,
             step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fidelity of ``engine`` (a :class:`~MedSynthLib.synthesis.synthesize.SynthesisEngine`) on ``case_dirs``.

    Args:
        engine: the loaded model.
        case_dirs: held-out cases (real images + expert segmentation).
        labels_for: folder -> its 7-class label map (derived, possibly cached).
        reference_dirs: cases whose class means define the class-mean baseline
            (the model's training cases); ``None`` skips that baseline.
        reader: folder -> the read case (with its segmentation), e.g. a cached reader when several
            models are scored on the same cases; ``read_case`` by default.
        progress: called with each case's name once it is scored.
        step: called with what was done after each part of the work: each reference case's class means, then per
            case each of :data:`CASE_STEPS` (a progress bar's step: a BraTS case takes minutes on a few CPU
            cores); :func:`evaluation_steps` counts the calls, parts shared from an earlier call included.
        shared: a dict the caller keeps while scoring several models on the same cases: the class
            means, each case's baseline scores and the rules on its real images, which do not depend on
            the model, are computed by the first call and reused by the next (a second model costs its
            synthesis and scoring only).

    Raises:
        ValueError: ``shared`` was filled with other reference cases.
        InputError: a folder given twice, or as a held-out and a reference case (by path: the command line also
            tells copies, by content, with :func:`refuse_repeated_cases`).
    """
    from ..schema.grid import LabelMap

    refuse_repeated_cases(case_dirs, reference_dirs or [], lambda folder: str(Path(folder).resolve()))
    read = reader if reader is not None else (lambda folder: read_case(folder, require_segmentation=True))
    store = shared if shared is not None else {}
    references = [str(folder) for folder in reference_dirs or []]
    if store.setdefault("reference_dirs", references) != references:
        raise ValueError("evaluate: the shared baselines were computed with other reference cases")
    done = step if step is not None else (lambda what: None)
    if reference_dirs and "class_means" not in store:
        store["class_means"] = class_means(reference_dirs, labels_for, reader, done)
    elif reference_dirs:
        for folder in reference_dirs:
            done(f"{Path(folder).name}: class means (shared)")
    means = store.get("class_means")
    baselines: dict[str, dict[str, Any]] = store.setdefault("baselines", {})
    results: dict[str, Any] = {"cases": [], "model": {"name": engine.model.name, "sha256": engine.model.sha256}}
    model_scores, oracle_scores, mean_scores = [], [], []
    for folder in case_dirs:
        case = read(folder)
        labels = labels_for(folder)
        done(f"{folder.name}: read")
        result = engine.synthesize(LabelMap(labels, case.grid))
        done(f"{folder.name}: synthesis")
        brain = real_brain_mask(case.images)
        regions = {"tumour": tumour_mask(labels)}
        model_case = {m: fidelity(case.images[m], result.images[m], brain, regions) for m in MODALITIES}
        done(f"{folder.name}: model scores")
        if str(folder) not in baselines:
            baselines[str(folder)] = _model_free_scores(case.images, labels, brain, regions, means, done,
                                                        folder.name)
        else:
            for part in CASE_STEPS[3:5 if means is not None else 4]:
                done(f"{folder.name}: {part} (shared)")
        model_free = baselines[str(folder)]
        oracle_case, real_power = model_free["class_mean_oracle"], model_free["real_period2_power"]
        model_scores.append(model_case)
        oracle_scores.append(oracle_case)
        entry = {"case": folder.name, "model": model_case, "class_mean_oracle": oracle_case,
                 "contrast_rules": {"synthetic": check_contrast_rules(result.images, labels, brain),
                                    "real": model_free["real_contrast_rules"]},
                 "checkerboard_ratio": {m: checkerboard_ratio_to(real_power[m], result.images[m], brain)
                                        for m in MODALITIES},
                 "class_signal": class_signal(case.images, result.images, result.normalized, engine.model.modalities,
                                              engine.model.normalizers, labels, brain,
                                              model_free["real_class_medians"])}
        if means is not None:
            mean_case = model_free["class_mean_training"]
            mean_scores.append(mean_case)
            entry["class_mean_training"] = mean_case
        entry["in_model_training"] = trained_on(engine.model, case)
        results["cases"].append(entry)
        done(f"{folder.name}: checks")
        if progress is not None:
            progress(folder.name)
    results["training_cases_scored"] = [entry["case"] for entry in results["cases"] if entry["in_model_training"]]
    results["summary"] = {"model": _summary(model_scores), "class_mean_oracle": _summary(oracle_scores)}
    results["contrast_rules"] = _rules_summary(results["cases"])
    results["class_signal"] = class_signal_summary(results["cases"])
    results["checkerboard_ratio"] = {
        m: float(np.median([c["checkerboard_ratio"][m] for c in results["cases"]])) for m in MODALITIES}
    if mean_scores:
        results["summary"]["class_mean_training"] = _summary(mean_scores)
    results["per_modality"] = {
        name: {m: {metric: float(np.mean([c[m]["brain"][metric] for c in scores])) for metric in ("ssim", "psnr", "mae")}
               for m in MODALITIES}
        for name, scores in (("model", model_scores), ("class_mean_oracle", oracle_scores),
                             ("class_mean_training", mean_scores)) if scores
    }
    return results
