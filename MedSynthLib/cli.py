"""The ``medsynth`` command line.

Every command checks its inputs and outputs before working, writes atomically,
never overwrites without ``--overwrite``, and reports bad input as one line on
stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .schema.errors import MedSynthError

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage problem as one line (and exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: {message} (see --help)")


class _UsageError(MedSynthError):
    pass


@contextmanager
def _progress(total: int, desc: str) -> Iterator[Callable[[str], None]]:
    """A tqdm step counter on stderr (shown on terminals only)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", disable=None, file=sys.stderr, leave=False)

    def step(label: str) -> None:
        bar.set_postfix_str(label)
        bar.update(1)

    try:
        yield step
    finally:
        bar.close()


SEED_LIMIT = 2 ** 32  # numpy's and torch's seeds, as MedSynth records them


def _seed(text: str) -> int:
    """``--seed``: a whole number in [0, 2**32)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r} (a whole number)") from None
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"seed {text} is outside [0, 2**32)")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r} (a whole number)") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {text} is outside 1-65535")
    return value


def _positive_int(text: str, least: int = 1, why: str = "") -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid whole number {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{text} must be at least {least}" + (f" ({why})" if why else ""))
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def _vector(values: Sequence[float] | None, name: str, allow_one: bool = False) -> tuple[float, float, float] | None:
    if values is None:
        return None
    if allow_one and len(values) == 1:
        values = [values[0]] * 3
    if len(values) != 3:
        raise _UsageError(f"{name} takes {'1 or ' if allow_one else ''}3 values, got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise _UsageError(f"{name} must be finite numbers, got {' '.join(str(v) for v in values)}")
    return tuple(values)  # type: ignore[return-value]


def _number(value: float, name: str, low: float = 0.0, high: float = math.inf) -> float:
    """A finite option value in ``[low, high]`` (NaN and infinities are refused by name)."""
    if not (math.isfinite(value) and low <= value <= high):
        raise _UsageError(f"{name} must lie in [{low:g}, {high:g}], got {value}")
    return value


SPREAD_HELP = ("how far a seed's appearance reaches from the model's mean appearance, 0 to the model's limit (1 "
               "unless its record declares more; default 1: the training cases' spread; 0: every seed the mean "
               "appearance); recorded")


def _add_case_options(parser: argparse.ArgumentParser) -> None:
    from .cases.readers import CASE_CONVENTIONS
    from .schema.labels import CONVENTIONS

    parser.add_argument("case", type=Path, nargs="?",
                        help="case folder (or MSD 4D image); or name the files with --t1 --t1ce --t2 --flair --seg")
    files = parser.add_argument_group("explicit files (any naming; instead of CASE)")
    for kind, text in (("t1", "T1 (required with explicit files)"), ("t1ce", "post-contrast T1"), ("t2", "T2"),
                       ("flair", "FLAIR"), ("seg", "tumour segmentation")):
        files.add_argument(f"--{kind}", type=Path, metavar="FILE", help=text)
    parser.add_argument("--convention", choices=CASE_CONVENTIONS,
                        help="naming convention of the case folder (default: detected)")
    parser.add_argument("--label-convention", choices=sorted(CONVENTIONS),
                        help="tumour label values of the segmentation (default: the naming convention's)")
    parser.add_argument("--resample", action="store_true",
                        help="resample volumes whose grid differs from the T1 instead of refusing")


_FILE_KINDS = ("t1", "t1ce", "t2", "flair", "seg")


def _read_case_args(args: argparse.Namespace, **kwargs: Any) -> Any:
    """The case of ``CASE`` or of ``--t1 ... --seg`` (exactly one of the two)."""
    from .cases.readers import read_case, read_case_files

    files = {kind: getattr(args, kind) for kind in _FILE_KINDS if getattr(args, kind) is not None}
    if args.case is not None and files:
        raise _UsageError(f"medsynth {args.command}: give a case folder or --t1 ... files, not both")
    if args.case is None:
        if not files:
            raise _UsageError(f"medsynth {args.command}: give a case folder or --t1 FILE (with --t2, --flair, ...)")
        if args.convention is not None:
            raise _UsageError(f"medsynth {args.command}: --convention applies to a case folder, not to --t1 ... files")
        return read_case_files(files, label_convention=args.label_convention or "brats2021",
                               resample=args.resample, **kwargs)
    return read_case(args.case, convention=args.convention, label_convention=args.label_convention,
                     resample=args.resample, **kwargs)


def _case_inputs(args: argparse.Namespace) -> list[Path]:
    """The files and folder a case command reads (``CASE`` and what is in it, or the ``--t1 ...`` files)."""
    from .schema.volume_io import folder_and_files

    return folder_and_files(args.case) + [getattr(args, kind) for kind in _FILE_KINDS
                                          if getattr(args, kind) is not None]


def _add_output(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("-o", "--output", required=True, type=Path, help=help_text)
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")


# --- commands ----------------------------------------------------------------------------------


def _refuse_medsynth_output(folders: Sequence[Path | None], reads: str) -> None:
    """A MedSynth output read as a patient's case has no segmentation file: its tumour would silently drop out."""
    from .schema.errors import InputError
    from .synthesis.case_folder import is_medsynth_output, labels_phrase

    for folder in folders:
        if folder is not None and is_medsynth_output(folder):
            raise InputError(folder, f"is a MedSynth output ({labels_phrase(folder)}), not a patient's case: {reads}")


def _is_patient_case_folder(folder: Path) -> bool:
    """Whether ``folder`` reads as a patient's case folder (any supported naming)."""
    from .cases.readers import detect_convention
    from .schema.errors import InputError

    if not folder.is_dir():
        return False
    try:
        detect_convention(folder)
    except InputError:
        return False
    return True


def _is_case_folder(folder: Path) -> bool:
    """Whether ``folder`` reads as a case folder: a patient's (any supported naming) or a MedSynth output."""
    from .synthesis.case_folder import is_medsynth_output

    return _is_patient_case_folder(folder) or (folder.is_dir() and is_medsynth_output(folder))


def _refuse_output_in_case_folders(output: Path, folders: Sequence[Path | None], written: str) -> None:
    """Refuse an output inside one of the case folders a command reads (links and '..' resolved), as ``prepare`` and
    ``export`` do: a file written there lies among the patient's scans, where a case reader or a copy of the case
    picks it up as the patient's."""
    from .schema.errors import InputError
    from .schema.volume_io import enclosing_folder

    inside = enclosing_folder(output, [folder for folder in folders if folder is not None])
    if inside is not None:
        raise InputError(output, f"lies inside the case folder {inside}: write the {written} outside the patients' "
                                 "case folders")


def _refuse_output_beside_case_files(output: Path, files: Sequence[Path | None]) -> None:
    """A label-map edit reading a file of a patient's case folder (its segmentation, or a map kept among its scans)
    does not write its map into that folder."""
    folders = [file.parent for file in files if file is not None and _is_patient_case_folder(file.parent)]
    _refuse_output_in_case_folders(output, folders, "label map")


def _medsynth_output_info(folder: Path) -> dict[str, Any]:
    """What ``info`` says of a case folder MedSynth wrote: its files, grid and the tumour of its own label map."""
    from .schema.labels import LABEL_INFO, TUMOUR_LABELS
    from .synthesis.case_folder import read_case_folder

    case = read_case_folder(folder)  # verifies every file against the sha256 its provenance recorded
    labels = case.labels.array
    privacy = case.raw_provenance.get("privacy") or {}
    mask = case.synthetic_mask
    return {
        "case": folder.name,
        "convention": "medsynth",
        "label_convention": None,
        "modalities": {m: case.file(m).name for m in case.images},
        "grid": case.grid.to_json(),
        "brain_voxels": int(case.brain_mask().sum()),
        "tumour_voxels": {LABEL_INFO[label].short_name: int((labels == label).sum()) for label in TUMOUR_LABELS},
        "medsynth_output": {"images": privacy.get("images", "synthetic"), "label_map": case.file("labels").name,
                            "model": (case.raw_provenance.get("model") or {}).get("name"),
                            "synthetic_voxels": None if mask is None else int(mask.sum())},
    }


def cmd_info(args: argparse.Namespace) -> int:
    from .schema.grid import Grid, format_vector
    from .schema.labels import LABEL_INFO, TUMOUR_LABELS
    from .synthesis.case_folder import is_medsynth_output

    if args.case is not None and is_medsynth_output(args.case):
        info = _medsynth_output_info(args.case)
    else:
        case = _read_case_args(args)
        tumour = {LABEL_INFO[label].short_name: int((case.tumour == label).sum()) if case.tumour is not None else 0
                  for label in TUMOUR_LABELS}
        info = {
            "case": case.case_id,
            "convention": case.convention,
            "label_convention": case.label_convention,
            "modalities": {m: str(p.name) for m, p in case.files.items()},
            "grid": case.grid.to_json(),
            "brain_voxels": int(case.brain_mask().sum()),
            "tumour_voxels": tumour if case.tumour is not None else None,
        }
    g = Grid.from_json(info["grid"])
    info["grid_ras"] = {"origin": list(g.origin_ras), "direction": list(g.direction_ras)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"case        {info['case']}")
    output = info.get("medsynth_output")
    if output is None:
        print(f"convention  {info['convention']} (tumour labels: {info['label_convention']})")
    elif output["images"] == "patient":
        print(f"convention  MedSynth output: the patient's images with {output['synthetic_voxels']} voxels "
              f"re-rendered (synthetic_mask.nii.gz), label map {output['label_map']}, model {output['model']}")
    else:
        print(f"convention  MedSynth output: synthetic images, label map {output['label_map']}, "
              f"model {output['model']}")
    for modality, name in info["modalities"].items():
        print(f"  {modality:<6}    {name}")
    print(f"grid        size {g.size}, spacing {g.spacing} mm, origin {format_vector(g.origin_ras)} mm RAS")
    print(f"            direction {format_vector(g.direction_ras)} RAS")
    print(f"brain       {info['brain_voxels']} voxels")
    if info["tumour_voxels"] is None:
        print("tumour      no segmentation")
    else:
        print("tumour      " + ", ".join(f"{k} {v}" for k, v in info["tumour_voxels"].items()))
    return 0


def cmd_labels(args: argparse.Namespace) -> int:
    from .cases.anatomy import ANATOMY_MODELS, anatomy_contrasts, derive_label_map, tissue_statistics
    from .schema.labelmap import label_map_outputs, write_label_map
    from .schema.volume_io import check_writable

    _refuse_medsynth_output([args.case], "medsynth labels derives a label map from a patient's scans")
    check_writable(label_map_outputs(args.output), args.overwrite, inputs=_case_inputs(args))
    # A file given with --t1 ... may come from a case folder: the map does not go there either.
    files = [getattr(args, kind) for kind in _FILE_KINDS if getattr(args, kind) is not None]
    _refuse_output_in_case_folders(args.output, [args.case, *(f.parent for f in files if _is_case_folder(f.parent))],
                                   "label map")
    model = ANATOMY_MODELS[args.anatomy]
    with _progress(3, "labels") as step:
        case = _read_case_args(args)
        step("read case")
        labelmap = derive_label_map(case, model)  # bad input is refused here, before any notice
        step("anatomy")
        contrasts = anatomy_contrasts(model, case.images)
        if hasattr(model, "used_contrasts") and not {"t2", "flair"} <= set(contrasts):
            missing = " and ".join(m.upper() for m in ("t2", "flair") if m not in case.images)
            _notice(f"no {missing} given: anatomy from {', '.join(c.upper() for c in contrasts)} only "
                    "(the documented fallback to the kmeans-t1 model; expect weaker grey/white separation)")
        write_label_map(labelmap, args.output, overwrite=args.overwrite)
        step("written")
    stats = tissue_statistics(labelmap.array, case.images["t1"])
    summary = ", ".join(f"{k} {v['fraction']:.1%}" for k, v in stats.items())
    print(f"{args.output}: 7-class label map written ({summary} of healthy tissue)")
    return 0


def _write_edited(labelmap: Any, args: argparse.Namespace) -> int:
    from .schema.labelmap import write_label_map
    from .schema.labels import label_counts

    counts = label_counts(labelmap.array)  # before the write: a Ctrl+C after it would report a written map as cancelled
    write_label_map(labelmap, args.output, overwrite=args.overwrite)
    print(f"{args.output}: written (NCR {counts['NCR']}, ED {counts['ED']}, ET {counts['ET']} voxels)")
    return 0


def cmd_tumour_transform(args: argparse.Namespace) -> int:
    from .edits import Flip, Rotate, Scale, Translate
    from .edits.base import clipped_notice
    from .schema.labelmap import label_map_inputs, label_map_outputs, read_label_map
    from .schema.volume_io import check_writable

    edits = []
    if args.flip_about is not None and not args.flip:  # else silently ignored
        raise _UsageError("medsynth tumour: --flip-about applies with --flip only (give --flip LR, AP or SI)")
    if args.flip:
        edits.append(Flip(args.flip, args.flip_about or "tumour"))
    if args.rotate is not None:
        edits.append(Rotate(_vector(args.rotate, "--rotate")))
    if args.scale is not None:
        factors = _vector(args.scale, "--scale", allow_one=True)
        edits.append(_edit_from_options(args.labels, lambda: Scale(factors), {"scale factors": "--scale"}))
    if args.translate is not None:
        edits.append(Translate(_vector(args.translate, "--translate")))
    if not edits:
        raise _UsageError("medsynth tumour: give at least one of --translate, --rotate, --scale, --flip")
    check_writable(label_map_outputs(args.output), args.overwrite, inputs=label_map_inputs(args.labels))
    labelmap = read_label_map(args.labels)  # read first: a broken input gets its own message
    _refuse_output_beside_case_files(args.output, [args.labels])
    for edit in edits:
        if isinstance(edit, Translate):
            _check_translate(edit, labelmap.grid, args.labels)
        before = labelmap.array
        labelmap = _apply_edit(edit, labelmap, args.labels)
        _refuse_no_change(edit, before, labelmap.array, args)
        clipped = labelmap.history[-1]["params"].get("clipped_tumour_voxels")  # whole-voxel moves record it
        if clipped:
            _notice(f"--{edit.name}: {clipped_notice(clipped)}")
    return _write_edited(labelmap, args)


def _refuse_no_change(edit: Any, before: Any, after: Any, args: argparse.Namespace) -> None:
    """An edit that changes no voxel is refused as a move of none is: its record would claim an edit not made."""
    import numpy as np

    from .schema.errors import EditError

    if not np.array_equal(before, after):
        return
    values = {"rotate": args.rotate, "scale": args.scale, "flip": [args.flip]}.get(edit.name) or []
    option = " ".join([f"--{edit.name}", *(v if isinstance(v, str) else f"{v:g}" for v in values)])
    if edit.name == "rotate":
        whole_turns = all(a % 360 == 0 for a in edit.angles_deg)
        why = "every angle a whole number of turns" if whole_turns else "too small an angle for this grid's voxels"
    elif edit.name == "scale":
        why = ("a factor of 1 keeps the tumour as it is" if all(f == 1 for f in edit.factors)
               else "too close to 1 for this grid's voxels")
    else:
        why = "the tumour is its own mirror image" if edit.name == "flip" else "nothing to record"
    raise EditError(f"{args.labels}: {option} changes no voxel ({why}): leave it out")


def _check_translate(edit: Any, grid: Any, path: Path) -> None:
    """--translate moves whole voxels: refuse a move of none, tell when the move differs from the request."""
    from .schema.errors import EditError

    try:
        edit.check(grid)  # a huge offset is refused before it is rounded
    except EditError as exc:
        raise EditError(f"{path}: {edit.name}: {exc}") from None
    requested = " ".join(f"{v:g}" for v in edit.offset_ras_mm)
    spacing = " x ".join(f"{v:g}" for v in grid.spacing)
    applied = edit.applied_offset(grid)
    if not any(applied):
        raise EditError(f"{path}: --translate {requested} mm moves no voxel on this grid (spacing {spacing} mm): "
                        "the tumour moves by whole voxels, give more than half a voxel")
    if max(abs(a - r) for a, r in zip(applied, edit.offset_ras_mm)) > 0.01:
        _notice(f"--translate: moved by {' '.join(f'{v:g}' for v in applied)} mm (whole voxels of the "
                f"{spacing} mm grid), not the requested {requested} mm")


def _edit_from_options(path: Path, make: Callable[[], Any], options: dict[str, str]) -> Any:
    """``make()``, its parameter errors naming the file and the CLI option (not the edit's field name)."""
    from .schema.errors import EditError

    try:
        return make()
    except EditError as exc:
        message = str(exc)
        option = next((opt for field, opt in options.items() if field in message), None)
        for field, opt in options.items():
            message = message.replace(field, opt)
        prefix = f"{path}: " if option is None or option in message else f"{path}: {option}: "
        raise EditError(prefix + message) from None


def _apply_edit(edit: Any, labelmap: Any, path: Path, **kwargs: Any) -> Any:
    from .schema.errors import EditError

    try:
        return edit(labelmap, **kwargs)
    except EditError as exc:
        raise EditError(f"{path}: {edit.name}: {exc}") from None


def _tumour_source_file(path: Path, option: str) -> Path:
    """The file a tumour source option names: the file given, or a patient's case folder's tumour segmentation
    (found by the case readers' naming), which is what the Slicer module records as an insert's source."""
    from .cases.readers import case_files, detect_convention
    from .schema.errors import InputError

    if not path.is_dir():
        return path
    _refuse_medsynth_output([path], f"give its label map file with {option}")
    if not _is_patient_case_folder(path):
        raise InputError(path, f"a folder of no known case naming: {option} takes a label map file or a patient's "
                               "case folder")
    # Found by name only: the scans play no part in a tumour source, so one MedSynth could not read must not stop it.
    files = case_files(path)
    if "seg" not in files:
        raise InputError(path, f"no tumour segmentation found ({detect_convention(path)} naming)")
    return files["seg"]


def _case_brain(folder: Path, seg: Path, source: Any) -> Any:
    """A source case folder's brain on its segmentation's grid, as the case readers find a case's brain (a scan
    non-zero, or tumour, holes filled).  Read only to place its tumour: a scan MedSynth cannot read, or one on
    another grid, is left out with a notice (each scan of a skull-stripped case shows the same brain)."""
    import SimpleITK as sitk

    from .cases.readers import brain_mask_of, case_files
    from .schema.errors import InputError
    from .schema.grid import Grid
    from .schema.labels import tumour_mask
    from .schema.volume_io import read_image

    scans = list(dict.fromkeys(path for key, path in case_files(folder).items() if key != "seg"))  # MSD: one file
    left_out: list[str] = []
    used = 0

    def arrays() -> Any:
        nonlocal used
        for path in scans:
            try:
                image = read_image(path, dims=None)
            except InputError as exc:
                left_out.append(f"{path.name} ({exc.problem})")
                continue
            channels = ([image[:, :, :, c] for c in range(image.GetSize()[3])] if image.GetDimension() == 4
                        else [image])
            difference = source.grid.difference(Grid.from_image(channels[0]))
            if difference is not None:
                left_out.append(f"{path.name} (on another grid than {seg.name}: {difference})")
                continue
            for channel in channels:
                array = sitk.GetArrayFromImage(channel)
                used += bool(array.any())
                yield array

    brain = brain_mask_of(arrays(), tumour_mask(source.array))
    if not used:
        why = f": {'; '.join(left_out)}" if left_out else ""
        raise InputError(folder, f"no scan shows the brain to place its tumour by{why}; give --centre (RAS mm) "
                                 "for the tumour's centre")
    for what in left_out:
        _notice(f"{folder}: {what}: left out of the brain the tumour is placed by")
    return brain


def cmd_tumour_insert(args: argparse.Namespace) -> int:
    from .edits import InsertTumour, tumour_centre
    from .edits.insert import tumour_in_brain
    from .schema.errors import EditError, InputError
    from .schema.grid import lps_to_ras
    from .schema.labelmap import label_map_inputs, label_map_outputs, read_label_map, read_tumour_source
    from .schema.labels import brain_mask, tumour_mask
    from .schema.provenance import array_sha256
    from .schema.volume_io import check_writable

    given = getattr(args, "from")
    from_path = _tumour_source_file(given, "--from")
    check_writable(label_map_outputs(args.output), args.overwrite,
                   inputs=label_map_inputs(from_path) + label_map_inputs(args.into))
    source = read_tumour_source(from_path, args.label_convention)
    target = read_label_map(args.into)
    _refuse_output_beside_case_files(args.output, [from_path, args.into])
    if not tumour_mask(source.array).any():
        raise MedSynthError(f"{from_path}: the source label map has no tumour to insert")
    centre = _vector(args.centre, "--centre")
    if centre is None and given.is_dir():
        # A case folder's tumour goes where the Slicer module puts it: at its place relative to the case's brain
        # (from its scans), recorded as the centre so that a replay needs the segmentation file alone.
        placed_by = tumour_in_brain(source, _case_brain(given, from_path, source))
        try:
            centre = tuple(float(v) for v in lps_to_ras(InsertTumour().placement_lps(target, placed_by)))
        except EditError as exc:
            raise EditError(f"{args.into}: {InsertTumour.name}: {exc}") from None
    elif centre is None and not (brain_mask(source.array) & ~tumour_mask(source.array)).any():
        # A tumour without its brain has no relative position to match: on the target's grid it keeps its own
        # place (BraTS cases share one), recorded as the centre so that a replay does the same.
        if source.grid.difference(target.grid) is not None:
            raise InputError(from_path, "a tumour segmentation without a brain, on another grid than --into: give "
                                        "--centre (RAS mm) for the tumour's centre")
        centre = tuple(float(v) for v in lps_to_ras(tumour_centre(source)))
    # The source's file name (the replay key; not its path, which may name a patient's folder) and content hash.
    edit = InsertTumour(centre_ras_mm=centre, keep_existing=args.keep_existing,
                        source=from_path.name, source_labels_sha256=array_sha256(source.array))
    return _write_edited(_apply_edit(edit, target, args.into, source=source), args)


def cmd_tumour_new(args: argparse.Namespace) -> int:
    from .edits import ParametricTumour
    from .schema.labelmap import label_map_inputs, label_map_outputs, read_label_map
    from .schema.volume_io import check_writable

    check_writable(label_map_outputs(args.output), args.overwrite, inputs=label_map_inputs(args.labels))
    labelmap = read_label_map(args.labels)  # read first: a broken input gets its own message
    _refuse_output_beside_case_files(args.output, [args.labels])
    centre, radii = _vector(args.centre, "--centre"), _vector(args.radius, "--radius", allow_one=True)
    rim, oedema = _number(args.rim, "--rim"), _number(args.oedema, "--oedema")
    irregularity = _number(args.irregularity, "--irregularity", 0.0, 1.0)
    edit = _edit_from_options(
        args.labels,
        lambda: ParametricTumour(centre_ras_mm=centre, radii_mm=radii, rim_mm=rim, necrosis=not args.no_necrosis,
                                 oedema_mm=oedema, irregularity=irregularity, seed=args.seed,
                                 keep_existing=args.keep_existing),
        {"radii_mm": "--radius", "centre_ras_mm": "--centre", "seed": "--seed"})
    return _write_edited(_apply_edit(edit, labelmap, args.labels), args)


def cmd_tumour_random(args: argparse.Namespace) -> int:
    from .edits import RandomTumourEdit
    from .schema.labelmap import label_map_inputs, label_map_outputs, read_label_map
    from .schema.volume_io import check_writable

    check_writable(label_map_outputs(args.output), args.overwrite, inputs=label_map_inputs(args.labels))
    labelmap = read_label_map(args.labels)  # read first: a broken input gets its own message
    _refuse_output_beside_case_files(args.output, [args.labels])
    sampler = RandomTumourEdit(p_parametric=_number(args.p_new, "--p-new", 0.0, 1.0))
    return _write_edited(_apply_edit(sampler, labelmap, args.labels, seed=args.seed), args)


def cmd_tumour_template(args: argparse.Namespace) -> int:
    """The healthy template's label map, as the library's template_label_map() makes it: a template case's base."""
    import shlex

    from .cases.template import TEMPLATE_NAME, template_label_map
    from .schema.labelmap import label_map_outputs, write_label_map
    from .schema.volume_io import check_writable

    check_writable(label_map_outputs(args.output), args.overwrite)
    write_label_map(template_label_map(), args.output, overwrite=args.overwrite)
    # A command to copy and run: CASE is a template case folder as demo or synthesize writes it.
    print(f"{args.output}: written, the {TEMPLATE_NAME} template's label map without a tumour (history: "
          f"template_labels); a template case replays from it: medsynth tumour replay {shlex.quote(str(args.output))} "
          f"--edits CASE/labels.nii.gz -o replayed_labels.nii.gz")
    return 0


def cmd_tumour_replay(args: argparse.Namespace) -> int:
    import numpy as np

    from .edits import EDITS, replay
    from .edits.random_edits import DrawMismatch
    from .schema.errors import EditError, InputError
    from .schema.labelmap import label_map_inputs, label_map_outputs, read_label_map, read_tumour_source
    from .schema.provenance import software_versions
    from .schema.volume_io import check_writable

    given = list(args.source or [])
    sources = [_tumour_source_file(path, "--source") for path in given]
    inputs = [f for path in [args.labels, args.edits, *sources] for f in label_map_inputs(path)]
    check_writable(label_map_outputs(args.output), args.overwrite, inputs=inputs)
    base = read_label_map(args.labels)
    edited = read_label_map(args.edits)
    _refuse_output_beside_case_files(args.output, [args.labels, args.edits, *sources])
    if not edited.history:
        raise InputError(args.edits, "has no edit history (no sidecar .json beside it): nothing to replay")
    # The records both histories start with made (or loaded) the base: the edits to replay follow them.  A map
    # of another patient may share them (a derive_labels record names no patient), so the voxels decide below.
    shared = 0
    while shared < min(len(base.history), len(edited.history)) and base.history[shared] == edited.history[shared]:
        shared += 1
    records = edited.history[shared:]
    while records and records[0].get("name") not in EDITS:  # what made EDITS's own base (another map's)
        records = records[1:]
    for record in records:
        if record.get("name") not in EDITS:
            raise InputError(args.edits, f"its history holds a {record.get('name')!r} record, which cannot be "
                                         "replayed (not a tumour edit: a stroke painted in Slicer?)")
    if not records:
        raise InputError(args.edits, f"holds no edit after {args.labels.name}'s history: nothing to replay")
    by_name: dict[str, Any] = {}
    given_as: dict[str, Path] = {}
    for path, as_given in zip(sources, given):  # an insert records its source by file name
        if path.name in by_name:
            raise _UsageError(f"medsynth tumour replay: two --source maps are named {path.name} "
                              f"({given_as[path.name]}, {as_given})")
        by_name[path.name] = read_tumour_source(path, args.label_convention)
        given_as[path.name] = as_given
    needed = sorted({str(r["params"].get("source")) for r in records
                     if r.get("name") == "insert_tumour" and isinstance(r.get("params"), dict)})
    missing = [name for name in needed if name not in by_name]
    if missing:
        raise InputError(args.edits, f"its insert_tumour edits need their source label map(s) {', '.join(missing)}: "
                                     "give each with --source PATH")
    this_version = software_versions()["medsynth"]
    written_by = _medsynth_version_of(args.edits)
    another_map = _not_its_base(base, edited, shared, args.labels.name, args.edits.name)
    another_version = (f"{args.edits.name} was written by MedSynth {written_by} (this is {this_version})"
                       if written_by is not None and written_by != this_version else None)
    redrawn = True
    try:
        result = replay(base, records, by_name)
    except DrawMismatch as exc:
        if args.check or another_map is None:
            reason = another_map or another_version or "its seed or options edited by hand"
            raise InputError(args.edits, f"{exc}: {reason}") from None
        # Onto another map the same seed draws otherwise: without --check the recorded edits are applied as they are.
        redrawn = False
        try:
            result = replay(base, records, by_name, check_draws=False)
        except EditError as again:
            raise EditError(f"{args.edits}: {again} ({another_map})") from None
    except EditError as exc:
        reason = another_map or another_version
        raise EditError(f"{args.edits}: {exc}" + (f" ({reason})" if reason else "")) from None
    differ = int(np.count_nonzero(result.array != edited.array)) if result.array.shape == edited.array.shape else -1
    why = another_map or another_version or "a record edited by hand (the sidecar's hash covers the voxels only)"
    if differ and args.check:
        raise InputError(args.edits, f"its history does not reproduce its voxels from {args.labels.name} "
                                     f"({'another grid' if differ < 0 else f'{differ} voxels differ'}): {why}")
    replayed = _replayed(records, redrawn)
    _write_edited(result, args)
    if not differ:
        print(f"{replayed} from {args.edits}: identical to it voxel for voxel")
        if another_version is not None:
            _notice(f"{another_version}: its edits replay identically")
    else:
        print(f"{replayed} from {args.edits}: the result differs from it ("
              f"{'another grid' if differ < 0 else f'{differ} voxels'}; {why})")
    return 0


def _medsynth_version_of(path: Path) -> str | None:
    """The MedSynth version a label map's sidecar says wrote it (read_label_map has read and checked the sidecar)."""
    from .schema.provenance import sidecar_path

    try:
        software = json.loads(sidecar_path(path).read_text()).get("software")
    except (OSError, ValueError, AttributeError):
        return None
    version = software.get("medsynth") if isinstance(software, dict) else None
    return str(version) if version is not None else None


_BASE_KINDS = {"template_labels": "the template's map", "derive_labels": "a map derived from a patient's scans"}


def _not_its_base(base: Any, edited: Any, shared: int, base_name: str, edits_name: str) -> str | None:
    """Why BASE is not the map EDITED was edited from, as its records and voxels tell; None where they agree.

    Edits never change which voxels are brain (a tumour stays inside it, the background is kept), so a brain that
    differs means another map even where the records agree (a derive_labels record names no patient)."""
    import numpy as np

    difference = base.grid.difference(edited.grid)
    if difference is not None:
        return f"{base_name} is on another grid ({difference})"
    first = [m.history[0] if m.history else {} for m in (base, edited)]
    names = [record.get("name") for record in first]
    if names[0] != names[1] and all(name in _BASE_KINDS for name in names):
        return f"{base_name} is {_BASE_KINDS[names[0]]}, {edits_name} was edited from {_BASE_KINDS[names[1]]}"
    models = [(record.get("params") or {}).get("anatomy_model") if isinstance(record.get("params"), dict) else None
              for record in first]
    if all(isinstance(m, dict) for m in models) and models[0] != models[1]:
        model_names = [m.get("name", "unnamed") for m in models]
        if model_names[0] != model_names[1]:
            return (f"{base_name} was derived by anatomy model {model_names[0]}, the map {edits_name} was edited from "
                    f"by {model_names[1]}")
        settings = sorted(k for k in set(models[0]) | set(models[1]) if models[0].get(k) != models[1].get(k))
        listed = ", ".join(f"{k} {models[0].get(k)} vs {models[1].get(k)}" for k in settings[:3])
        return (f"{base_name} was derived by anatomy model {model_names[0]} with other settings than the map "
                f"{edits_name} was edited from ({listed}{', ...' if len(settings) > 3 else ''})")
    brain_differs = int(np.count_nonzero((base.array > 0) != (edited.array > 0)))
    if brain_differs:
        return (f"{base_name}'s brain is not the one {edits_name} was edited from ({brain_differs} voxels differ): "
                "another patient's map, or the same scans labelled otherwise")
    extra = [r.get("name") for r in base.history[shared:]]
    if extra:
        return f"{base_name} holds edits that {edits_name}'s history does not ({', '.join(map(str, extra))})"
    return None


def _replayed(records: list[dict[str, Any]], redrawn: bool = True) -> str:
    """``N edits replayed (names)``, naming the random draws that made them: a draw's record changes no voxel.

    ``redrawn``: replay drew each draw again on the map before it and found the edits recorded after it (False:
    onto another map, where its seed draws otherwise, the recorded edits were applied as they are)."""
    from .edits.random_edits import RandomTumourDraw

    draws = [r["params"] for r in records if r["name"] == RandomTumourDraw.name]
    edits = [r["name"] for r in records if r["name"] != RandomTumourDraw.name]
    line = f"{len(edits)} edit{'s' if len(edits) != 1 else ''} replayed" + (f" ({', '.join(edits)})" if edits else "")
    if not draws:
        return line
    seeds = " and ".join(str(d["seed"]) for d in draws)
    by = f"drawn by {RandomTumourDraw.name} seed{'s' if len(draws) > 1 else ''} {seeds}"
    if not redrawn:
        by += " on the map they were recorded on (on this one the seed draws others)"
    counts = [d.get("drawn_edits") for d in draws]
    drawn = sum(counts) if None not in counts else len(edits)  # a record without its count: all taken as drawn
    return f"{line}, {by}" if drawn >= len(edits) else f"{line}, {drawn} of them {by}"


DEMO_TUMOUR = dict(centre_ras_mm=(28.0, -12.0, 26.0), radii_mm=(17.0, 15.0, 14.0), rim_mm=2.5,
                   oedema_mm=12.0, irregularity=0.35, seed=2018)


def cmd_demo(args: argparse.Namespace) -> int:
    """Healthy ICBM152 brain -> its label map -> a generated tumour -> the shipped model -> a case."""
    from .cases.template import TEMPLATE_NAME, template_label_map
    from .edits import ParametricTumour
    from .schema.volume_io import check_writable
    from .synthesis.models import resolve_model
    from .synthesis.render import render_montage
    from .synthesis.synthesize import SynthesisEngine, write_synthesis

    check_writable([args.output], args.overwrite)
    model = resolve_model(args.model)
    with _progress(4, "demo") as step:
        canvas = template_label_map()
        step("template label map")
        labelmap = ParametricTumour(**DEMO_TUMOUR)(canvas)  # type: ignore[arg-type]
        step("tumour")
        _keep_freed_memory_for(labelmap)
        engine = SynthesisEngine(model, args.device, args.precision, log=_notice)
        result = engine.synthesize(labelmap, seed=0)
        step("synthesised")

        def montage(folder: Path) -> None:
            render_montage({m.upper() if m != "t1ce" else "T1ce": result.images[m] for m in result.images},
                           labelmap.array, labelmap.grid, folder / "montage.png",
                           title=f"synthetic case: {TEMPLATE_NAME} + parametric tumour, model {model.name}")

        write_synthesis(result, args.output, overwrite=args.overwrite, extra=montage)
        step("written")
    print(f"{args.output}: t1, t1ce, t2, flair, labels (NIfTI), montage.png, provenance.json "
          f"(model {model.name}, {engine.device}, network {result.provenance['timings_s']['network']:.2f} s)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .training.train import TrainConfig, train

    config = TrainConfig()
    raw = None
    if args.config is not None:
        raw = _read_json(args.config)
        config = TrainConfig.from_json(raw, str(args.config))
    overrides = {k: v for k, v in (("precision", args.precision), ("threads", args.threads),
                                   ("init_from", args.init), ("cv_fold", args.fold)) if v is not None}
    if overrides:
        config = TrainConfig.from_json({**config.to_json(), **overrides}, "command line")
    command = "medsynth " + " ".join(sys.argv[1:]) if args.command_line is None else args.command_line
    case_folders = _case_folders_in(args.data)
    _refuse_output_in_case_folders(args.output, case_folders, "run")
    if args.cache is not None:
        _refuse_output_in_case_folders(args.cache, case_folders, "cache")
    # A resume keeps the recorded run: these are checked against it, not applied.
    given = dict(overrides, config=raw) if args.resume else None
    model = train(args.data, args.output, config, resume=args.resume, device=args.device, command=command,
                  cache_dir=args.cache, steps=args.steps, given=given)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line (rank 0 wrote the model)
        print(f"{model}: model written")
    return 0


def cmd_appearance(args: argparse.Namespace) -> int:
    from .training.appearance_fit import refit_appearance

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    command = "medsynth " + " ".join(sys.argv[1:]) if args.command_line is None else args.command_line
    _refuse_output_in_case_folders(args.output, _case_folders_in(args.data), "model")
    model = refit_appearance(args.model, args.data, args.output, patches=args.patches, cache_dir=args.cache,
                             device=args.device, overwrite=args.overwrite, command=command)
    prior = model.appearance
    assert prior is not None  # refit_appearance wrote it and resolve_model read it back
    spread = ", ".join(f"{v ** 0.5:.2f}" for v in (prior.covariance[i][i] for i in range(prior.style_dim)))
    print(f"{args.output}: {model.name} with the appearance prior of {prior.patches} training patches "
          f"(sha256 {model.sha256}, unchanged); code spread per dimension {spread}")
    return 0


def _case_folders_in(roots: Sequence[Path]) -> list[Path]:
    """The case folders of ``--data`` roots (a prepared set holds none); a root without any is left for the
    command's own reading to report."""
    from .schema.errors import InputError
    from .training.data import PREPARED_SET_FILE, find_case_folders

    folders: list[Path] = []
    for root in roots:
        if not (root / PREPARED_SET_FILE).is_file():
            try:
                folders += find_case_folders(root)
            except InputError:
                pass
    return folders


def _at_least_two(text: str) -> int:
    return _positive_int(text, 2, "a covariance")


def _fold_count(text: str) -> int:
    return _positive_int(text, 2, "one fold is held out while the others train")


def cmd_prepare(args: argparse.Namespace) -> int:
    from .schema.errors import InputError
    from .schema.volume_io import check_writable, enclosing_folder
    from .training.data import find_case_folders, write_prepared_set
    from .training.train import TrainConfig

    config = TrainConfig.from_json(_read_json(args.config), str(args.config)) if args.config else TrainConfig()
    check_writable([args.output], args.overwrite, inputs=args.data)
    folders = [f for root in args.data for f in find_case_folders(root)]
    inside = enclosing_folder(args.output, folders)  # a prepared set there puts derived volumes among the scans
    if inside is not None:
        raise InputError(args.output, f"lies inside the case folder {inside}: write the prepared set outside "
                                      "the patients' case folders")
    command = "medsynth " + " ".join(sys.argv[1:])
    out = write_prepared_set(folders, args.output, config.normalization, cache_dir=args.cache,
                             overwrite=args.overwrite, command=command, progress=True)
    print(f"{out}: prepared training set of {len(folders)} cases written ({config.normalization})")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from .study.report import verdict_lines
    from .study.run import load_config, run_study

    config = load_config(args.config)
    for key, option in (("threads", "--threads"), ("gan_model", "--gan-model")):  # argparse checks only the type
        if getattr(args, key) is not None:
            config = config.with_options({key: getattr(args, key)}, option)
    command = "medsynth " + " ".join(sys.argv[1:]) if args.command_line is None else args.command_line
    case_folders = _case_folders_in([args.data])
    _refuse_output_in_case_folders(args.output, case_folders, "report")
    if args.work is not None:
        _refuse_output_in_case_folders(args.work, case_folders, "work folder")
    report = run_study(args.data, args.output, config, extra_labels=args.extra_labels, work=args.work,
                       device=args.device, folds=args.folds, overwrite=args.overwrite, command=command,
                       progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":
        summary = report["segmentation"]["summary"]
        for arm, regions in summary.items():
            print(f"{arm:<20} Dice WT {regions['WT']['dice']['mean']:.3f}  TC {regions['TC']['dice']['mean']:.3f}  "
                  f"ET {regions['ET']['dice']['mean']:.3f}")
        print(f"{args.output}: report.json, report.md, figures/ written "
              f"({report['timings']['wall_seconds_this_run'] / 60:.1f} min)")
        # Last, so the per-arm Dice above is read with the gate and the corrected comparisons, as report.md opens.
        for line in verdict_lines(report, console=True):
            print(line)
    return 0


def cmd_synthesize(args: argparse.Namespace) -> int:
    from .synthesis.appearance import check_appearance_spread, check_model_spread

    if args.context is not None:
        if args.appearance_spread is not None:  # inpainting keeps the patient's appearance: no code to draw
            raise _UsageError("medsynth synthesize: --appearance-spread applies to whole synthetic cases, "
                              "not with --context")
        return _synthesize_in_context(args)
    if args.old_labels is not None or args.region_margin is not None:
        raise _UsageError("medsynth synthesize: --old-labels and --region-margin apply with --context only")
    spread = 1.0 if args.appearance_spread is None else check_appearance_spread(args.appearance_spread,
                                                                                 "--appearance-spread")
    from .schema.labelmap import label_map_inputs, read_label_map
    from .synthesis.models import resolve_model
    from .synthesis.synthesize import SynthesisEngine, write_synthesis

    from .schema.volume_io import check_writable

    check_writable([args.output], args.overwrite, inputs=label_map_inputs(args.labels))
    _check_not_in_a_case_folder(args)
    with _progress(3, "synthesize") as step:
        labelmap = read_label_map(args.labels)
        _keep_freed_memory_for(labelmap)
        model = resolve_model(args.model)
        check_model_spread(spread, model, "--appearance-spread")
        engine = SynthesisEngine(model, args.device, args.precision, log=_notice, mirror_average=args.mirror_average,
                                 appearance_spread=spread)
        step("model loaded")
        result = engine.synthesize(labelmap, seed=args.seed)
        step("synthesised")
        write_synthesis(result, args.output, overwrite=args.overwrite)
        step("written")
    timings = result.provenance["timings_s"]
    print(f"{args.output}: t1, t1ce, t2, flair, labels + provenance.json "
          f"({engine.device}, {engine.synth.precision}, network {timings['network']:.2f} s)")
    return 0


def _synthesize_in_context(args: argparse.Namespace) -> int:
    """``synthesize --context CASE``: re-render only the changed tumour region of a real case."""
    from .schema.errors import InputError
    from .schema.labelmap import label_map_inputs, read_label_map
    from .schema.volume_io import check_writable, folder_and_files
    from .schema.labels import brain_mask
    from .synthesis.inpainting import (DEFAULT_MARGIN_MM, MIN_BRAIN_DICE, InpaintingEngine, inpaint_case, mask_dice,
                                       plan_region, read_context, write_inpainted_case)
    from .synthesis.models import resolve_model

    inputs = label_map_inputs(args.labels) + folder_and_files(args.context)
    if args.old_labels is not None:
        inputs += label_map_inputs(args.old_labels)
    check_writable([args.output], args.overwrite, inputs=inputs)
    _check_not_in_a_case_folder(args)
    margin = DEFAULT_MARGIN_MM if args.region_margin is None else _number(args.region_margin, "--region-margin",
                                                                          0.0, 100.0)
    with _progress(3, "inpaint") as step:
        labelmap = read_label_map(args.labels)
        context = read_context(args.context, labelmap)
        old = None
        if args.old_labels is not None:
            old = read_label_map(args.old_labels)
            difference = labelmap.grid.difference(old.grid)
            if difference is not None:
                raise InputError(args.old_labels, f"not on the grid of {args.labels}: {difference}")
            dice = mask_dice(brain_mask(old.array), brain_mask(labelmap.array))
            if dice < MIN_BRAIN_DICE:  # edits never move the brain outline
                raise InputError(args.old_labels, f"its brain does not match that of {args.labels} (Dice {dice:.3f}, "
                                                  f"{MIN_BRAIN_DICE} or more expected): not the map before this edit")
        # Where the old tumour was and what changed are settled before the model loads: a refusal costs nothing.
        plan = plan_region(labelmap, context, old_labelmap=old, margin_mm=margin, labels_name=args.labels)
        engine = InpaintingEngine(resolve_model(args.model, kind="inpainting"), args.device, args.precision,
                                  log=_notice, mirror_average=args.mirror_average)
        step("model loaded")
        case = inpaint_case(engine, labelmap, context, old_labelmap=old, margin_mm=margin, seed=args.seed, plan=plan)
        step("inpainted")
        write_inpainted_case(case, args.output, overwrite=args.overwrite)
        step("written")
    timings = case.provenance["timings_s"]
    print(f"{args.output}: t1, t1ce, t2, flair (the real case, {int(case.region.sum())} voxels re-rendered), labels, "
          f"synthetic_mask + provenance.json; NOT anonymous (the patient's images) "
          f"({engine.synth.device}, network {timings['network']:.2f} s)")
    return 0


def _check_not_in_a_case_folder(args: argparse.Namespace) -> None:
    """Refuse an output inside the context case folder, or inside a case folder that holds a label map given.

    :func:`~MedSynthLib.schema.volume_io.check_writable` refuses an output that is an input or holds one; an
    output inside the patient's case folder would put derived (partly synthetic) images among the scans.
    """
    folders = [args.context]
    for labels in (args.labels, args.old_labels):
        if labels is not None and _is_case_folder(labels.parent):
            folders.append(labels.parent)
    _refuse_output_in_case_folders(args.output, folders, "output")


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate.card import card_command
    from .generate.runner import GenerateOptions, generate

    # The card shows the command as typed (paths hidden), not every option's default: main() keeps the words.
    typed = getattr(args, "typed_argv", None)
    command = args.command_line if args.command_line is not None else card_command(typed) if typed else ""
    summary = generate(GenerateOptions(
        n=args.n, output=args.output, labels_from=args.labels_from or [], template=args.template, edits=args.edits,
        model=args.model, layout=args.layout, dataset_id=args.dataset_id, name=args.name, workers=args.workers,
        seed=args.seed, appearance_spread=args.appearance_spread, label_convention=args.label_convention,
        anonymous=args.anonymous, device=args.device, precision=args.precision, cache=args.cache,
        overwrite=args.overwrite, progress=not args.quiet,
        command=command))
    state = "complete" if summary["finished"] else "this rank's share done"
    print(f"{args.output}: {summary['cases_complete']} of {summary['n']} cases ({state}; "
          f"{summary['cases_done_here']} made by this run in {summary['seconds']:.0f} s)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .cases.anatomy import derive_label_map
    from .cases.case_key import case_files_hash
    from .cases.readers import read_case
    from .evaluation.evaluate import evaluate, evaluation_steps, refuse_repeated_cases, trained_on
    from .schema.errors import InputError
    from .schema.volume_io import check_writable, folder_and_files, write_json
    from .synthesis.appearance import check_appearance_spread, check_model_spread
    from .synthesis.models import resolve_model
    from .synthesis.synthesize import SynthesisEngine

    if args.output.suffix.lower() != ".json":
        raise InputError(args.output, "the report is JSON: give a file name ending in .json")
    _refuse_medsynth_output([*args.cases, *(args.reference or [])],
                            "medsynth evaluate scores synthesis against a patient's real scans")
    check_writable([args.output], args.overwrite,
                   inputs=[f for folder in [*args.cases, *(args.reference or [])] for f in folder_and_files(folder)])
    _refuse_output_in_case_folders(args.output, [*args.cases, *(args.reference or [])], "report")
    spread = check_appearance_spread(args.appearance_spread, "--appearance-spread")
    model = resolve_model(args.model)
    check_model_spread(spread, model, "--appearance-spread")
    held_out = set(args.cases)
    in_training: dict[Path, bool] = {}
    last_read: dict[Path, Any] = {}

    def read(folder: Path) -> Any:
        """The case, read once for its scoring and its label map (one case kept: a BraTS case is ~140 MB)."""
        if folder not in last_read:
            last_read.clear()
            last_read[folder] = read_case(folder, require_segmentation=True)
        return last_read[folder]

    def content_key(folder: Path) -> str:
        case = read(folder)
        if folder in held_out:
            in_training[folder] = trained_on(model, case)
        return case_files_hash(case)

    refuse_repeated_cases(list(args.cases), list(args.reference or []), content_key)
    seen = [folder.name for folder in args.cases if in_training[folder]]
    if seen:  # said before the run, which takes about a minute a case
        _notice(f"{len(seen)} of {len(args.cases)} cases were among {model.name}'s training cases "
                f"({', '.join(seen)}): their scores are in-sample, not held-out")
    engine = SynthesisEngine(model, args.device, args.precision, log=_notice, mirror_average=args.mirror_average,
                             appearance_spread=spread)
    cache: dict[Path, Any] = {}

    def labels_for(folder: Path) -> Any:
        if folder not in cache:
            cache[folder] = derive_label_map(read(folder)).array
        return cache[folder]

    references = list(args.reference or [])
    # One BraTS case with a reference case, default model, on the 2-core machine: 52 s wall, 55 CPU s, 1.9 GB peak
    # RSS (255-450 s under load with MONAI's non-separable SSIM: its 12 SSIMs were three quarters of the time).
    with _progress(evaluation_steps(len(args.cases), len(references)), "evaluate") as step:
        results = evaluate(engine, list(args.cases), labels_for, references or None, reader=read, step=step)
    results["inference"] = {"device": engine.device, "precision": engine.synth.precision,
                            "mirror_average": engine.synth.mirror_average}
    if engine.network.has_style:  # seed 0's appearance, at this spread
        results["inference"]["appearance_spread"] = engine.appearance_spread
    write_json(results, args.output, overwrite=args.overwrite)
    for name, summary in results["summary"].items():
        print(f"{name:<22} SSIM {summary['brain_ssim']:.3f}  PSNR {summary['brain_psnr']:.2f} dB  "
              f"MAE {summary['brain_mae']:.3f}  (tumour SSIM {summary.get('tumour_ssim', float('nan')):.3f})")
    furthest = []
    for modality, signal in results["class_signal"].items():
        if signal["classes"]:
            name, row = max(signal["classes"].items(), key=lambda item: abs(item[1]["patient_frame_minus_real"]))
            furthest.append(f"{modality} {name} {row['patient_frame_minus_real']:+.2f}")
    if furthest:
        print("class signal in the patient's frame, furthest from the real median (z): " + ", ".join(furthest))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export.package import export_cases

    if args.naming is not None and args.format != "nifti":
        raise _UsageError("medsynth export: --naming applies to --format nifti only")
    cases = list(args.cases)
    with _progress(2 * len(cases), "export") as step:
        targets = export_cases(cases, args.output, args.format, naming=args.naming or "brats2021",
                               case_id=args.case_id, overwrite=args.overwrite, anonymous=args.anonymous,
                               progress=step)
    for target in targets:
        print(f"{target}: {_exported_what(target)}")
    return 0


def _exported_what(target: Path) -> str:
    """What an exported case is, from its own provenance: synthetic or a patient's scan, anonymous or not."""
    provenance = json.loads((target / "provenance.json").read_text())
    fmt = provenance["export"]["format"]
    if provenance.get("inpainting"):
        return (f"a real patient's scan with one region re-rendered exported ({fmt}); NOT anonymous "
                "(partly synthetic: the patient's images outside the region)")
    if provenance.get("privacy", {}).get("anatomy") == "patient":
        return f"synthetic images of a real patient's anatomy exported ({fmt}); NOT anonymous"
    return f"synthetic case exported ({fmt}); {'anonymous' if provenance['export']['anonymous'] else 'NOT anonymous'}"


def _notice(message: str) -> None:
    print(f"medsynth: {message}", file=sys.stderr)


def cmd_review(args: argparse.Namespace) -> int:
    if args.summarise is not None:
        from .evaluation.reader_study import summary_text, write_summary

        print(summary_text(write_summary(args.summarise)))
        return 0
    if not args.cases and not args.pair and not args.study:
        raise _UsageError("medsynth review: give CASE_DIRS, --study or --summarise (see --help)")
    if args.allow_paired and not args.study:
        raise _UsageError("medsynth review: --allow-paired applies with --study only")
    import importlib
    import importlib.util

    # The web front end is an optional package (MedSynthWeb, extra "web") that renders with the
    # Slicer libraries; it is looked up only here, so the rest of medsynth never needs it.
    missing = [name for name in ("trame", "trame_slicer") if importlib.util.find_spec(name) is None]
    if missing:
        raise _UsageError(f"medsynth review needs the web extra ({', '.join(missing)} not installed): "
                          "pip install 'medsynth[web]'")
    return int(importlib.import_module("MedSynthWeb.cli").serve(args))


def cmd_models(args: argparse.Namespace) -> int:
    from .synthesis.appearance import spread_limit
    from .synthesis.models import (DEFAULT_KEYS, REGISTRY_NAME, default_problem, models_root, read_registry,
                                   register_model, registry_path_of_default, resolve_model, share_model,
                                   shipped_models_root, user_models_root, user_registry_origin)

    if args.share is not None:
        if args.register is not None or args.default:
            raise _UsageError("medsynth models: --share takes no --register or --default")
        if args.output is None:
            raise _UsageError("medsynth models --share needs -o OUT (the folder to give away)")
        model = share_model(args.share, args.output, name=args.name, overwrite=args.overwrite)
        print(f"{args.output}: a copy of {args.share} to share as {model.name} (sha256 {model.sha256}); its config "
              "names no training case, path or command")
        return 0
    if args.output is not None:
        raise _UsageError("medsynth models: -o applies with --share only")
    if args.register is None and (args.name or args.default):
        raise _UsageError("medsynth models: --name and --default apply with --register or --share only")
    if args.register is None and args.appearance_spread_limit is not None:
        raise _UsageError("medsynth models: --appearance-spread-limit applies with --register only")
    if args.register is None and args.trust_config:
        raise _UsageError("medsynth models: --trust-config applies with --register only")
    if args.register is not None:
        if not args.name:
            raise _UsageError("medsynth models --register needs --name")
        model = register_model(args.register, args.name, make_default=args.default, overwrite=args.overwrite,
                               spread_limit=args.appearance_spread_limit, trust_config=args.trust_config)
        limit = ""
        if model.appearance is not None:  # say where the limit came from: the flag, the model's record, or neither
            source = ("--appearance-spread-limit" if args.appearance_spread_limit is not None
                      else "as its config records" if "spread_limit" in model.config["appearance"]
                      else "none recorded")
            limit = f", appearance spread up to {spread_limit(model):g} ({source})"
        trusted = ("; its config as it is now recorded as the model's, with its checksum"
                   if args.trust_config else "")
        root = models_root()
        print(f"{root / args.name}: registered as {args.name} in {root / REGISTRY_NAME}"
              f"{' (shipped)' if root == shipped_models_root() else ''} (sha256 {model.sha256}{limit}){trusted}")
        return 0

    registry = read_registry()
    shipped = shipped_models_root() / "registry.json"
    if not registry.get("models"):
        print(f"no models registered in {' or '.join(dict.fromkeys(str(r) for r in (shipped.parent, models_root())))}")
    broken, kinds = [], {}
    for name in sorted(registry["models"]):
        entry = registry["models"][name]
        default = "".join(" (default)" if kind == "synthesis" else f" (default {kind})"
                          for kind, key in DEFAULT_KEYS.items() if name == registry.get(key))
        origin = (user_registry_origin() if Path(entry["registry"]) != shipped
                  else "shipped, read-only" if user_models_root() else "shipped")
        try:
            model = resolve_model(name)
            status, kinds[name] = "ok", model.kind
            description = model.config.get("description", "")
            spread = f"0 to {spread_limit(model):g}" if model.network.has_style else ""  # synthesis models only
        except MedSynthError as exc:
            status, description, spread = f"BROKEN: {exc}", "", ""
            broken.append(name)
        print(f"{name}{default}\n  folder   {entry['path']}\n  registry {entry['registry']} ({origin})\n"
              f"  sha256   {entry['sha256']}\n  status   {status}"
              + (f"\n  about    {description}" if description else "")
              + (f"\n  spread   {spread} (--appearance-spread)" if spread else ""))
    # The listing is also the verification: a broken model or default is a failed check, as sha256sum -c says.
    # Each problem names the registry.json that lists it.
    problems: dict[str, list[str]] = {}
    for name in broken:
        problems.setdefault(registry["models"][name]["registry"], []).append(name)
    listed = [entry["registry"] for entry in registry["models"].values()]
    lines = {path: [f"{len(names)} of {listed.count(path)} registered models failed verification "
                    f"({', '.join(names)})"] for path, names in problems.items()}
    for kind, key in DEFAULT_KEYS.items():
        problem = default_problem(registry, kind, kinds.get(registry.get(key)))
        if problem:
            lines.setdefault(str(registry_path_of_default(registry, kind)), []).append(f"the registry's {problem}")
    if lines:
        raise MedSynthError("; ".join(f"{path}: {'; '.join(found)}" for path, found in lines.items()))
    return 0


def _read_json(path: Path) -> Any:
    from .schema.jsonshape import read_json

    return read_json(path, "config", expect=None)


# --- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .schema.labels import CONVENTIONS as TUMOUR_CONVENTIONS

    parser = _Parser(prog="medsynth", description="MedSynth: synthetic brain-tumour MRI from label maps.")
    parser.add_argument("--version", action="version", version=f"medsynth {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("info", help="describe a case folder: convention, modalities, grid, label counts")
    _add_case_options(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("labels", help="derive the 7-class label map (CSF/GM/WM + NCR/ED/ET) of a case")
    _add_case_options(p)
    p.add_argument("--anatomy", default="atlas-em", choices=("atlas-em", "kmeans-t1"),
                   help="anatomy model: atlas-em (T1+T2+FLAIR, N4, ICBM152 priors; the default) or kmeans-t1 "
                        "(the former T1-only model, kept for comparison)")
    _add_output(p, "output label map (.nii.gz); provenance goes beside it as .json")
    p.set_defaults(func=cmd_labels)

    tumour = sub.add_parser("tumour", aliases=["tumor"], help="edit the tumour of a label map",
                            description="Tumour edits. `medsynth tumour LABELS --translate ...` transforms the "
                                        "tumour; `insert`, `new`, `random`, `template` (the tumour-free template "
                                        "map) and `replay` are subcommands. `tumor` is the same command.")
    # The metavar is what usage and a missing-argument error show: what a user types, not the internal dest.
    tsub = tumour.add_subparsers(dest="tumour_command", required=True, parser_class=_Parser,
                                 metavar="{LABELS,transform,insert,new,random,template,replay}")

    p = tsub.add_parser("transform", help="move / rotate / scale / flip the tumour (the default)")
    p.add_argument("labels", type=Path, help="MedSynth label map")
    p.add_argument("--translate", type=_finite_float, nargs="+", metavar="MM", help="offset R A S in mm")
    p.add_argument("--rotate", type=_finite_float, nargs="+", metavar="DEG",
                   help="rotation about the RAS x, y, z axes through the tumour centre, degrees")
    p.add_argument("--scale", type=_finite_float, nargs="+", metavar="S", help="scale factor (1 value or 3 per axis)")
    p.add_argument("--flip", choices=("LR", "AP", "SI"), help="mirror the tumour along an axis")
    p.add_argument("--flip-about", choices=("tumour", "brain"),
                   help="with --flip: mirror plane through the tumour centre (the default) or the brain mid-plane "
                        "(other hemisphere)")
    _add_output(p, "output label map (.nii.gz)")
    p.set_defaults(func=cmd_tumour_transform)

    p = tsub.add_parser("insert", help="insert the tumour of one label map (or tumour segmentation) into another brain")
    p.add_argument("--from", required=True, type=Path, metavar="LABELS",
                   help="MedSynth label map holding the tumour, or an expert tumour segmentation (BraTS *_seg, MSD; "
                        "no brain: placed at its own position on the same grid, else at --centre), or a patient's "
                        "case folder (its segmentation file, placed where it lies relative to the case's brain, as "
                        "the Slicer module places it, unless --centre)")
    p.add_argument("--label-convention", choices=sorted(TUMOUR_CONVENTIONS),
                   help="--from is a tumour segmentation with these values (default: a MedSynth label map when it "
                        "is one, else a segmentation whose convention is detected)")
    p.add_argument("--into", required=True, type=Path, metavar="LABELS", help="label map of the target brain")
    p.add_argument("--centre", "--center", dest="centre", type=_finite_float, nargs=3, metavar="MM",
                   help="RAS point for the tumour centre (default: the matching relative position)")
    p.add_argument("--keep-existing", action="store_true", help="keep the target's own tumour")
    _add_output(p, "output label map (.nii.gz)")
    p.set_defaults(func=cmd_tumour_insert)

    p = tsub.add_parser("new", help="draw a parametric tumour (core, enhancing rim, oedema)")
    p.add_argument("labels", type=Path, help="MedSynth label map")
    p.add_argument("--centre", "--center", dest="centre", type=_finite_float, nargs=3, required=True, metavar="MM",
                   help="centre, RAS mm")
    p.add_argument("--radius", type=_finite_float, nargs="+", required=True, metavar="MM", help="radius (1 or 3 values, mm)")
    p.add_argument("--rim", type=_finite_float, default=2.0, metavar="MM", help="enhancing rim thickness (mm)")
    p.add_argument("--oedema", type=_finite_float, default=10.0, metavar="MM", help="oedema extent beyond the tumour (mm)")
    p.add_argument("--irregularity", type=_finite_float, default=0.3, help="boundary irregularity, 0-1")
    p.add_argument("--no-necrosis", action="store_true", help="no necrotic core (enhancing throughout)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the shape's noise")
    p.add_argument("--keep-existing", action="store_true", help="keep the map's current tumour")
    _add_output(p, "output label map (.nii.gz)")
    p.set_defaults(func=cmd_tumour_new)

    p = tsub.add_parser("random", help="a random tumour edit, replayable from its recorded parameters")
    p.add_argument("labels", type=Path, help="MedSynth label map")
    p.add_argument("--seed", type=_seed, required=True, help="seed of the draw")
    p.add_argument("--p-new", type=_finite_float, default=0.25, help="probability of drawing a new parametric tumour")
    _add_output(p, "output label map (.nii.gz)")
    p.set_defaults(func=cmd_tumour_random)

    p = tsub.add_parser("template", help="write the healthy template's label map (no tumour): the map a template "
                                         "case was edited from, for tumour replay")
    _add_output(p, "output label map (.nii.gz); its history (template_labels) goes beside it as .json")
    p.set_defaults(func=cmd_tumour_template)

    p = tsub.add_parser("replay", help="apply the edits recorded in an edited map's sidecar to a label map "
                                       "(and compare the result with the edited map's voxels)")
    p.add_argument("labels", type=Path, help="MedSynth label map to start from")
    p.add_argument("--edits", type=Path, required=True, metavar="EDITED",
                   help="an edited label map: the edits its sidecar records after LABELS's history are replayed")
    p.add_argument("--source", type=Path, action="append", metavar="MAP",
                   help="the source label map of a recorded insert_tumour (matched by file name and content hash), "
                        "or a patient's case folder (its segmentation file)")
    p.add_argument("--label-convention", choices=sorted(TUMOUR_CONVENTIONS),
                   help="the --source maps are tumour segmentations with these values (as given to tumour insert)")
    p.add_argument("--check", action="store_true",
                   help="LABELS is the map EDITED was edited from: refuse (exit 2, nothing written) a result that "
                        "differs from EDITED's voxels")
    _add_output(p, "output label map (.nii.gz)")
    p.set_defaults(func=cmd_tumour_replay)

    p = sub.add_parser("synthesize", help="label map -> T1, T1ce, T2, FLAIR (a complete synthetic case)")
    p.add_argument("labels", type=Path, help="MedSynth 7-class label map")
    _add_output(p, "output case folder")
    p.add_argument("--model", help="registered model name or model folder (default: the registry's default)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps")
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16")
    p.add_argument("--seed", type=_seed, default=0,
                   help="draws the appearance of models with an appearance code (no effect on others); recorded")
    p.add_argument("--appearance-spread", type=_finite_float, metavar="S", help=SPREAD_HELP)
    p.add_argument("--context", type=Path, metavar="CASE_DIR",
                   help="a real case folder: keep its images and re-render only the changed tumour region "
                        "(inpainting model; the output carries the patient's images and is not anonymous)")
    p.add_argument("--region-margin", type=_finite_float, metavar="MM",
                   help="with --context: grow the changed tumour by this margin into the re-rendered region "
                        "(default 8 mm: oedema and mass effect)")
    p.add_argument("--old-labels", type=Path, metavar="OLD",
                   help="with --context: the label map before the edit (default: the case's own segmentation "
                        "is the old tumour)")
    p.add_argument("--no-mirror-average", dest="mirror_average", action="store_false",
                   help="one forward pass instead of averaging it with the pass on the left-right mirrored label "
                        "map (about half the network time; recorded in the provenance)")
    p.set_defaults(func=cmd_synthesize)

    p = sub.add_parser("generate", help="a ready-to-train synthetic dataset (nnU-Net, MSD, BraTS layouts), "
                                        "resumable, over processes, GPUs and torchrun ranks")
    p.add_argument("-n", type=int, required=True, help="number of cases")
    p.add_argument("--labels-from", nargs="+", type=Path, metavar="DIR",
                   help="folders of real case folders (anatomy derived once, cached) or of tumour label maps")
    p.add_argument("--label-convention", choices=sorted(TUMOUR_CONVENTIONS),
                   help="tumour label values of the tumour-only label maps in --labels-from (default: each map's, "
                        "from its values and shape; a map where they cannot tell BraTS from msd is refused). A case "
                        "folder's follow its naming convention")
    p.add_argument("--template", action="store_true", help="also draw on the healthy ICBM152 template brain")
    p.add_argument("--edits", type=Path, metavar="CONFIG", help="sampler config (JSON; default: built in)")
    p.add_argument("--model", help="registered model name or model folder (default: the shipped model)")
    p.add_argument("--layout", required=True, choices=["nnunet", "msd", "brats2021", "brats2023"])
    p.add_argument("--dataset-id", type=int, help="nnU-Net dataset id / MSD task number (default 501; not for the "
                                                  "BraTS layouts, which have no dataset folder)")
    p.add_argument("--name", default="BrainTumourSynth", help="dataset name (letters and digits)")
    _add_output(p, "output folder (resumed when it holds the same run)")
    p.add_argument("--workers", type=int, default=1, help="CPU worker processes (one model copy each)")
    p.add_argument("--seed", type=_seed, default=0, help="case i draws from (seed, i)")
    p.add_argument("--appearance-spread", type=_finite_float, default=1.0, metavar="S", help=SPREAD_HELP)
    p.add_argument("--anonymous", action="store_true",
                   help="only anonymous cases (a parametric tumour in the template brain; needs --template)")
    p.add_argument("--device", default="auto", help="auto (every GPU, else the CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16")
    p.add_argument("--cache", type=Path, help="anatomy cache folder, outside OUT (default: generate-cache in the "
                                              "user's MedSynth folder, MEDSYNTH_HOME; shared by every run)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--command-line", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("evaluate", help="fidelity of a model on real cases (SSIM, PSNR, MAE in brain and tumour; "
                                        "about a minute per case on 2 CPU cores)")
    p.add_argument("cases", type=Path, nargs="+", help="held-out case folders")
    p.add_argument("--reference", type=Path, nargs="*", help="training case folders for the class-mean baseline")
    _add_output(p, "report JSON")
    p.add_argument("--model", help="registered model name or model folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16")
    p.add_argument("--no-mirror-average", dest="mirror_average", action="store_false",
                   help="one forward pass instead of averaging it with the pass on the left-right mirrored label "
                        "map (about half the network time)")
    p.add_argument("--appearance-spread", type=_finite_float, default=1.0, metavar="S",
                   help="the appearance spread of the synthesis (seed 0), 0 to the model's limit (default 1; 0: the "
                        "mean appearance)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="share synthetic cases: BraTS NIfTI or DICOM, marked synthetic, de-identified",
                       description="Export `medsynth synthesize` output folders into EXPORT_DIR/<case-id>/ as "
                                   "BraTS-named NIfTI or DICOM (MR series + Segmentation), marked synthetic, "
                                   "with sanitised provenance and nothing of the source patient.")
    p.add_argument("cases", type=Path, nargs="+", metavar="OUT_DIR", help="synthetic case folder(s)")
    p.add_argument("--format", required=True, choices=("nifti", "dicom"), help="export format")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="EXPORT_DIR",
                   help="export folder; each case goes into a sub-folder named by its case id")
    p.add_argument("--naming", choices=("brats2021", "brats2023"),
                   help="NIfTI file names and tumour values: brats2021 (_t1 ..., ET=4, the default) or "
                        "brats2023 (-t1n ..., ET=3)")
    p.add_argument("--case-id", metavar="ID",
                   help="case id of a single case (default: generated from the synthetic content, SYNTH-<hash> for an "
                        "anonymous case, NOT-ANONYMOUS-<hash> or PATIENT-<hash> otherwise)")
    p.add_argument("--overwrite", action="store_true", help="replace existing exported case folders")
    p.add_argument("--anonymous", action="store_true",
                   help="refuse a case whose label map is a patient's own or too close to it (README: "
                        "'What is and is not anonymous')")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("models", help="list the registered models and verify their files")
    p.add_argument("--register", type=Path, metavar="MODEL_DIR", help="copy a trained model folder into your registry "
                   "(MEDSYNTH_MODELS, else models/ in your MedSynth folder, MEDSYNTH_HOME)")
    p.add_argument("--share", type=Path, metavar="MODEL", help="write a copy of a model (folder or registered "
                   "name) to give away: the same weights, a config naming no training case, path or command")
    p.add_argument("-o", "--output", type=Path, help="output folder for --share")
    p.add_argument("--name", help="registry name for --register; the shared model's name for --share")
    p.add_argument("--default", action="store_true", help="make the registered model the default")
    p.add_argument("--appearance-spread-limit", type=_finite_float, metavar="S",
                   help="with --register: the widest appearance spread synthesis accepts with the model (1 to 2), "
                        "as measured for its model card; default: the limit the model folder's config records, "
                        "else 1")
    p.add_argument("--trust-config", action="store_true",
                   help="with --register: adopt a model whose config has no config_sha256 (written before MedSynth "
                        "recorded it), vouching that its config is the model's as trained; the registered copy and "
                        "the registry record its checksum")
    p.add_argument("--overwrite", action="store_true", help="replace a registered model of that name, or "
                   "--share's output folder")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("train", help="train the label-map -> MRI GAN (torchrun for several GPUs or nodes)")
    p.add_argument("--data", required=True, type=Path, nargs="+",
                   help="folder(s) of case folders (any supported convention), or prepared sets (medsynth prepare)")
    p.add_argument("-o", "--output", required=True, type=Path, help="run folder (checkpoints, logs, model/)")
    p.add_argument("--config", type=Path, help="training configuration JSON (see Resources/configs)")
    p.add_argument("--steps", type=_positive_int, help="override the number of steps (with --resume: change the run's length)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), help="override the precision")
    p.add_argument("--threads", type=_positive_int, help="CPU threads for torch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.add_argument("--init", metavar="MODEL",
                   help="fine-tune: start the generator from this model's weights (name or folder; same network)")
    p.add_argument("--cache", type=Path, help="folder of prepared cases to share between runs (default RUN_DIR/cache)")
    p.add_argument("--fold", type=int, help="cross-validation: hold out fold K of the config's cv_folds")
    p.add_argument("--command-line", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("appearance", help="give a model trained without one the appearance prior its seeds draw "
                                          "from (fitted on its own training cases)")
    p.add_argument("model", help="registered name or model folder (a network with an appearance code)")
    p.add_argument("--data", required=True, type=Path, nargs="+",
                   help="folder(s) holding the model's training cases (case folders or prepared sets)")
    p.add_argument("-o", "--output", required=True, type=Path, help="the new model folder (same weights)")
    p.add_argument("--patches", type=_at_least_two, help="training patches to encode (default: the model's "
                   "appearance_patches, else 1000)")
    p.add_argument("--cache", type=Path, help="folder of prepared cases (as `medsynth train --cache`)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    p.add_argument("--threads", type=_positive_int, help="CPU threads for torch")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--command-line", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_appearance)

    p = sub.add_parser("prepare", help="prepare training cases once (label maps, normalised images) into a set "
                                       "`medsynth train --data` takes on a machine without the scans")
    p.add_argument("--data", required=True, type=Path, nargs="+", help="folder(s) of case folders")
    p.add_argument("-o", "--output", required=True, type=Path, help="the prepared set's folder")
    p.add_argument("--config", type=Path, help="the training configuration it is for (its normalisation)")
    p.add_argument("--cache", type=Path, help="folder of prepared cases shared with `medsynth train --cache`")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("study", help="the experiments of Shin et al. 2018 on your data: segmentation with real / "
                                     "synthetic data, synthesis fidelity, memorisation check, one report",
                       description="Cross-validated study: per fold a GAN trained on the training cases, synthetic "
                                   "cases from edited training label maps, a tumour segmenter trained in every arm "
                                   "(real, real+synthetic, synthetic, synthetic+fine-tune, the class-mean and "
                                   "copy-paste controls, 25 / 50 % of the real cases; several seeds) and scored on "
                                   "the held-out real cases against a FLAIR-threshold baseline, GAN fidelity and a "
                                   "memorisation check. Interrupted studies resume from the work folder.")
    p.add_argument("--data", required=True, type=Path, help="folder of case folders (one convention, with segmentations)")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="REPORT_DIR",
                   help="report folder (report.json, report.md, figures/), written atomically at the end")
    p.add_argument("--config", default="tiny", help="micro, tiny, cpu, paper or a study config JSON (default tiny)")
    p.add_argument("--folds", type=_fold_count, help="override the number of folds (k-fold by case, at least 2)")
    p.add_argument("--extra-labels", type=Path, nargs="+", metavar="PATH",
                   help="tumour label maps without images (files or folders) for the synthetic arms")
    p.add_argument("--work", type=Path, help="cache folder for resuming (default REPORT_DIR.cache, beside the report)")
    p.add_argument("--gan-model", metavar="MODEL",
                   help="use this trained GAN instead of training one per fold ('{fold}' is replaced by the fold number)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--threads", type=_positive_int, help="CPU threads for torch")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars (stage lines only)")
    p.add_argument("--command-line", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("review", help="review cases in a web browser (rating, note) or run a blinded reader study",
                       description="Serve a local web page: the four contrasts of synthetic cases beside their real "
                                   "cases with tumour outlines, a rating and a note; or a blinded 'real or "
                                   "synthetic?' reader study. Needs the web extra: pip install 'medsynth[web]'.")
    p.add_argument("cases", nargs="*", type=Path, metavar="CASE_DIR",
                   help="synthetic and/or real case folders (synthetic: from synthesize, export --format nifti, or "
                        "a case folder of generate --layout brats2021/brats2023); a synthetic case is shown with the "
                        "real case given beside it whose brain (else tumour in place) it has")
    p.add_argument("--pair", nargs=2, type=Path, action="append", metavar=("SYNTHETIC", "REAL"),
                   help="show a synthetic case beside the real case it was made from (repeatable)")
    p.add_argument("--port", type=_port, default=8080, help="port of the web page (default 8080)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this computer only)")
    p.add_argument("--study", nargs="+", type=Path, metavar="REAL_DIR",
                   help="run a blinded reader study: these real cases against --synthetic cases")
    p.add_argument("--synthetic", nargs="+", type=Path, metavar="SYN_DIR", help="synthetic cases of the study")
    p.add_argument("-o", "--output", type=Path, help="results folder of the study (resumed when it exists)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the study's draw and order, 0 to 2**32-1 (default 0)")
    p.add_argument("--n-per-class", type=int, help="images per class (default: all the smaller class has)")
    p.add_argument("--allow-paired", action="store_true",
                   help="let the study hold synthetic cases made from its own real cases (that patient's anatomy "
                        "or tumour in place: a paired comparison, refused otherwise); the pairs are recorded in "
                        "the plan and the summary")
    p.add_argument("--summarise", type=Path, metavar="RESULTS_DIR",
                   help="summarise a study's answers (accuracy, 95 %% CI, per contrast) and exit")
    p.set_defaults(func=cmd_review)

    p = sub.add_parser("demo", help="the main job: a synthetic case from the built-in healthy template "
                                    "with a generated tumour (no download)")
    _add_output(p, "output folder")
    p.add_argument("--model", help="registered model name or model folder (default: the shipped model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16")
    p.set_defaults(func=cmd_demo)
    return parser


_TUMOUR_COMMANDS = ("tumour", "tumor")  # one command, both spellings
_TUMOUR_SUBCOMMANDS = {"transform", "insert", "new", "random", "template", "replay", "-h", "--help"}
@contextmanager
def _quiet_itk() -> Iterator[None]:
    """ITK's warnings off while a command runs (restored after: main() also runs inside other programs)."""
    import SimpleITK as sitk

    before = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(before)




def _normalise_argv(argv: list[str]) -> list[str]:
    """``medsynth tumour LABELS --translate ...`` means ``medsynth tumour transform LABELS ...`` (also ``tumor``)."""
    # Only the command word (the first non-option word): elsewhere "tumor" may be a case folder or a file.
    at = next((i for i, word in enumerate(argv) if not word.startswith("-")), None)
    if at is not None and argv[at] in _TUMOUR_COMMANDS:
        if at + 1 < len(argv) and argv[at + 1] not in _TUMOUR_SUBCOMMANDS:
            return argv[: at + 1] + ["transform"] + argv[at + 1:]
    return argv


#: The case reader's hints name options of `medsynth info` / `labels`; a command without the option (`synthesize
#: --context`, `train`, `evaluate`, ...) says what to do instead, never an option argparse would refuse.
_CASE_OPTION_HINTS = (
    ("--resample", " (use --resample to resample)", " (resample it onto the T1's grid first)"),
    ("--convention", " (choose with --convention)", " (rename the files to one naming)"),
    ("--label-convention", " (choose another with --label-convention)",
     " (relabel the segmentation in its naming's tumour values)"),
)


def _command_options(parser: argparse.ArgumentParser, command: str | None) -> set[str] | None:
    """The option strings of subcommand ``command`` (None when it is not found)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return set(action.choices[command]._option_string_actions)
    return None


def _command_parser(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.ArgumentParser:
    """The (sub)command parser ``argv`` reaches: ``medsynth tumour new`` for ``tumor new ...``."""
    for token in argv:
        choices = next((action.choices for action in parser._actions
                        if isinstance(action, argparse._SubParsersAction)), None)
        if choices is None:
            break
        if token in choices:
            parser = choices[token]
    return parser


def _without_foreign_hints(message: str, options: set[str] | None) -> str:
    if options is None:
        return message
    for option, hint, instead in _CASE_OPTION_HINTS:
        if option not in options:
            message = message.replace(hint, instead)
    return message


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input)."""
    import warnings

    args_list = _normalise_argv(list(sys.argv[1:] if argv is None else argv))
    options: set[str] | None = None
    args: argparse.Namespace | None = None
    try:
        # Library warnings (ITK's C++ warnings, numpy's and torch's Python ones) would turn the one
        # line MedSynth promises into several; what matters is raised as a MedSynthError instead.
        with warnings.catch_warnings(), _quiet_itk():
            warnings.simplefilter("ignore")
            parser = build_parser()
            args, unknown = parser.parse_known_args(args_list)
            if unknown:
                # argparse reports these at the top-level parser ("medsynth: unrecognized ..."): name the command.
                _command_parser(parser, args_list).error(f"unrecognized arguments: {' '.join(unknown)}")
            options = _command_options(parser, getattr(args, "command", None))
            if options is not None and getattr(args, "command", None) == "generate":
                # generate's --label-convention reads tumour-only maps; a case folder's values follow its naming.
                options = options - {"--label-convention"}
                args.typed_argv = args_list  # the dataset card's command, as typed
            return int(args.func(args))
    except MedSynthError as exc:
        message = _without_foreign_hints(' '.join(str(exc).split()), options)
        print(f"medsynth: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except PermissionError as exc:  # the environment, not a bug: name the file
        print(f"medsynth: error: {exc.filename}: permission denied", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt as exc:
        from .schema.errors import Terminated

        hint = _resume_hint(args)
        if hint is not None and os.environ.get("RANK", "0") == "0":
            print(f"medsynth: {hint}", file=sys.stderr)
        if isinstance(exc, Terminated):
            print("medsynth: terminated", file=sys.stderr)
            return 143  # 128 + SIGTERM, what the shell reports for a process SIGTERM ended
        print("medsynth: cancelled", file=sys.stderr)
        return 130


def _resume_hint(args: argparse.Namespace | None) -> str | None:
    """How a cancelled generate run resumes: the same command, which finds the cases it finished.

    None for other commands (an interrupted training run names its own --resume command, a study the stages it
    kept) and for an interrupted ``generate --overwrite``, which put the old dataset back: the same command starts
    the new one over.
    """
    if getattr(args, "command", None) != "generate" or args.overwrite:
        return None
    again = ("start the same torchrun command again" if "TORCHELASTIC_RUN_ID" in os.environ
             else "run the same command again")
    return f"to resume, {again}: the finished cases are kept in {args.output}"


# Commands whose every output is complete (written atomically, files closed) when main() returns.
_FAST_EXIT_COMMANDS = {"synthesize", "demo"}
#: Set by the ``medsynth`` program for those commands: the process is MedSynth's own and ends after one synthesis, so
#: it may keep freed memory (``runtime.keep_freed_memory``); never in a host that calls :func:`main`.
_OWN_SHORT_PROCESS = False


def _keep_freed_memory_for(labelmap: Any) -> None:
    if _OWN_SHORT_PROCESS:
        from .synthesis.runtime import keep_freed_memory

        keep_freed_memory(int(labelmap.array.size))


def _terminate_as_cancel() -> None:
    """SIGTERM (a scheduler's or a service manager's stop) takes the cancellation path: cleanups run, exit 143."""
    import signal

    from .schema.errors import Terminated

    def terminated(signum: int, frame: Any) -> None:
        raise Terminated()

    signal.signal(signal.SIGTERM, terminated)


def console_main() -> None:
    """The ``medsynth`` program: :func:`main`, then exit.

    After ``synthesize`` and ``demo`` the process ends without the interpreter's
    teardown, which with torch loaded takes about 0.6 s here (a process that
    imports MedSynth and torch: 2.2 s with a normal exit, 1.5 s with ``os._exit``)
    and does nothing those commands need: their outputs are already complete.
    """
    from .synthesis.runtime import avoid_hugepage_stalls

    avoid_hugepage_stalls()  # a process-wide setting: only in MedSynth's own process, not in main()
    _terminate_as_cancel()
    argv = sys.argv[1:]
    global _OWN_SHORT_PROCESS
    _OWN_SHORT_PROCESS = bool(argv) and argv[0] in _FAST_EXIT_COMMANDS
    status = main(argv)  # synthesize and demo are the first word: no tumour shorthand to normalise
    if _OWN_SHORT_PROCESS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    console_main()
