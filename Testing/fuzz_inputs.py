"""Builders of hostile inputs for the fuzz suite (``Testing/test_fuzz.py``).

Every builder takes a :class:`Workspace` (a fresh folder plus the good inputs
shared by all cases) and returns a :class:`FuzzCase`: the ``medsynth`` arguments,
the file or argument the error line must name, and the output location that must
stay untouched.  Builders are grouped by class of bad input; ``CASES`` lists them
all, ``MEMORY_CASES`` those that must run in a child process under a memory limit.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from conftest import phantom, write_volume

IMAGES, SEG = phantom()


@dataclass
class Workspace:
    """A fresh folder for one case and the good inputs every case may copy."""

    tmp: Path
    case: Path  # a good BraTS 2021 phantom case folder
    labels: Path  # its 7-class label map (+ sidecar)
    model: Path  # a good tiny model folder
    data: Path  # a folder holding the good case (training data)

    @property
    def out(self) -> Path:
        return self.tmp / "out"


@dataclass
class FuzzCase:
    argv: list
    named: str  # the error line must contain this (a path or an argument)
    outputs: list[Path] = field(default_factory=list)  # must not exist afterwards
    words: str = ""  # and, when given, these words


Builder = Callable[[Workspace], FuzzCase]
CASES: dict[str, Builder] = {}
MEMORY_CASES: dict[str, Builder] = {}


def case(builder: Builder) -> Builder:
    CASES[builder.__name__] = builder
    return builder


def memory_case(builder: Builder) -> Builder:
    MEMORY_CASES[builder.__name__] = builder
    return builder


# --- helpers ---------------------------------------------------------------------------------------


def copy_case(ws: Workspace) -> Path:
    return Path(shutil.copytree(ws.case, ws.tmp / "case"))


def copy_labels(ws: Workspace) -> Path:
    target = ws.tmp / "in" / ws.labels.name
    target.parent.mkdir()
    shutil.copy(ws.labels, target)
    shutil.copy(ws.labels.with_name(ws.labels.name.replace(".nii.gz", ".json")), target.with_name("labels.json"))
    return target


def copy_model(ws: Workspace) -> Path:
    return Path(shutil.copytree(ws.model, ws.tmp / "model"))


def nifti_header(shape, dtype=np.uint8, pixdim=(1.0, 1.0, 1.0), slope: float | None = None) -> bytes:
    """The 352 bytes of a NIfTI-1 single file (header + empty extension flag)."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_qform(np.eye(4), code=1)
    header.set_sform(None, code=0)
    header["pixdim"][1:4] = pixdim  # after the qform, which would reset them
    if slope is not None:
        header["scl_slope"] = slope
        header["scl_inter"] = 0.0
    header["vox_offset"] = 352
    return header.binaryblock + b"\x00" * 4


def write_nifti_raw(path: Path, array: np.ndarray, pixdim=(1.0, 1.0, 1.0), slope: float | None = None) -> Path:
    """A NIfTI written byte by byte (so hostile header fields stay as given)."""
    data = nifti_header(array.shape[::-1], array.dtype, pixdim, slope) + np.ascontiguousarray(array).tobytes()
    path.write_bytes(gzip.compress(data, 1) if path.name.endswith(".gz") else data)
    return path


def zero_nifti_gz(path: Path, side: int) -> Path:
    """A valid gzip NIfTI of ``side``^3 zero voxels (1024^3 is about 1 MB).

    Written as concatenated gzip members (valid gzip, read by every reader): the
    header, then one compressed 16 MiB block of zeros repeated, so it costs no time.
    """
    chunk = 1 << 24
    block = gzip.compress(bytes(chunk), 9)
    with open(path, "wb") as handle:
        handle.write(gzip.compress(nifti_header((side,) * 3)))
        for _ in range(side ** 3 // chunk):
            handle.write(block)
        if side ** 3 % chunk:
            handle.write(gzip.compress(bytes(side ** 3 % chunk)))
    return path


def sparse_nifti(path: Path, side: int) -> Path:
    """An uncompressed NIfTI of ``side``^3 zero voxels as a sparse file (no disk used)."""
    with open(path, "wb") as handle:
        handle.write(nifti_header((side,) * 3))
        handle.truncate(352 + side ** 3)
    return path


def labels_run(ws: Workspace, path: Path) -> FuzzCase:
    """``tumor`` on a bad label map."""
    out = ws.out.with_suffix(".nii.gz")
    return FuzzCase(["tumor", path, "--translate", "1", "0", "0", "-o", out], str(path), [out])


def synth_run(ws: Workspace, labels: Path | None = None, model: Path | None = None, *extra) -> FuzzCase:
    labels = labels or ws.labels
    argv = ["synthesize", labels, "-o", ws.out, "--device", "cpu", "--model", model or ws.model, *extra]
    return FuzzCase(argv, str(model or labels), [ws.out])


# --- corrupt, truncated, wrong-type image files ----------------------------------------------------


@case
def image_garbage_bytes(ws):
    path = ws.tmp / "garbage.nii.gz"
    path.write_bytes(os.urandom(5000))
    return labels_run(ws, path)


@case
def image_empty_file(ws):
    path = ws.tmp / "empty.nii.gz"
    path.write_bytes(b"")
    return labels_run(ws, path)


@case
def image_text_as_nii(ws):
    path = ws.tmp / "text.nii"
    path.write_text("this is not an image\n" * 30)
    return labels_run(ws, path)


@case
def image_gzip_of_garbage(ws):
    path = ws.tmp / "gz.nii.gz"
    path.write_bytes(gzip.compress(os.urandom(1000)))
    return labels_run(ws, path)


@case
def image_truncated_gzip(ws):
    path = copy_labels(ws)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return labels_run(ws, path)


@case
def image_header_only(ws):
    path = ws.tmp / "header.nii"
    path.write_bytes(nifti_header((40, 48, 44)))
    return labels_run(ws, path)


@case
def image_is_a_folder(ws):
    path = ws.tmp / "folder.nii.gz"
    path.mkdir()
    return labels_run(ws, path)


@case
def image_unknown_suffix(ws):
    path = ws.tmp / "labels.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(100))
    return labels_run(ws, path)


@case
def image_nrrd_garbage_header(ws):
    path = ws.tmp / "labels.nrrd"
    path.write_text("NRRD0004\ntype: banana\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n\n")
    return labels_run(ws, path)


@case
def image_mha_missing_data_file(ws):
    path = ws.tmp / "labels.mhd"
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 40 48 44\nElementType = MET_UCHAR\n"
                    "ElementDataFile = nowhere.raw\n")
    return labels_run(ws, path)


@case
def image_mha_negative_size(ws):
    path = ws.tmp / "labels.mhd"
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 40 -48 44\nElementType = MET_UCHAR\n"
                    "ElementDataFile = data.raw\n")
    (ws.tmp / "data.raw").write_bytes(bytes(1000))
    return labels_run(ws, path)


# --- hostile headers --------------------------------------------------------------------------------


@case
def header_pixdim_zero(ws):
    path = write_nifti_raw(ws.tmp / "pix0.nii.gz", SEG.astype(np.uint8), pixdim=(1.0, 0.0, 1.0))
    return labels_run(ws, path)


@case
def header_pixdim_negative(ws):
    path = write_nifti_raw(ws.tmp / "pixneg.nii.gz", SEG.astype(np.uint8), pixdim=(1.0, -2.0, 1.0))
    return labels_run(ws, path)


@case
def header_pixdim_nan(ws):
    path = write_nifti_raw(ws.tmp / "pixnan.nii.gz", SEG.astype(np.uint8), pixdim=(1.0, float("nan"), 1.0))
    return labels_run(ws, path)


@case
def header_pixdim_huge(ws):
    path = write_nifti_raw(ws.tmp / "pixhuge.nii.gz", SEG.astype(np.uint8), pixdim=(1e30, 1.0, 1.0))
    return labels_run(ws, path)


def _with_datatype(path: Path, datatype: int, bitpix: int) -> Path:
    """``path`` (uncompressed NIfTI-1) with its datatype and bitpix fields replaced."""
    data = bytearray(path.read_bytes())
    data[70:74] = struct.pack("<hh", datatype, bitpix)
    path.write_bytes(bytes(data))
    return path


def _datatype_case(ws: Workspace, name: str, datatype: int, bitpix: int, words: str) -> FuzzCase:
    path = _with_datatype(write_nifti_raw(ws.tmp / name, SEG.astype(np.uint8)), datatype, bitpix)
    case = labels_run(ws, path)
    case.words = words
    return case


@case
def header_datatype_unknown(ws):
    """A datatype code NIfTI does not define: the NIfTI library behind SimpleITK prints its own line for it."""
    return _datatype_case(ws, "dt.nii", 9999, 8, "datatype 9999")


@case
def header_bitpix_mismatch(ws):
    """uint8 data whose header claims 16 bits per voxel."""
    return _datatype_case(ws, "bp.nii", 2, 16, "bitpix 16")


@case
def output_is_the_input_label_map(ws):
    """``-o`` naming the input itself, even with --overwrite: the user's input is never replaced."""
    labels = copy_labels(ws)
    case = FuzzCase(["tumor", labels, "--translate", "1", "0", "0", "-o", labels, "--overwrite"], str(labels),
                    words="is also an input")
    case.unchanged = {labels: labels.read_bytes()}
    return case


@case
def output_is_a_file_of_the_input_case(ws):
    """``labels CASE -o CASE/<its T1>`` with --overwrite: the patient's scan is never replaced."""
    case_dir = copy_case(ws)
    t1 = next(case_dir.glob("*_t1.nii.gz"))
    case = FuzzCase(["labels", case_dir, "-o", t1, "--overwrite"], str(t1), words="is also an input")
    case.unchanged = {p: p.read_bytes() for p in case_dir.iterdir()}
    return case


@case
def output_folder_is_the_context_case(ws):
    """``synthesize --context CASE -o CASE --overwrite`` would replace the patient's case folder."""
    case_dir = copy_case(ws)
    case = FuzzCase(["synthesize", ws.labels, "--context", case_dir, "-o", case_dir, "--overwrite", "--device",
                     "cpu"], str(case_dir), words="is also an input")
    case.unchanged = {p: p.read_bytes() for p in case_dir.iterdir()}
    return case


@case
def header_scl_slope_overflow_case(ws):
    """int16 T1 whose scl_slope 1e38 makes the scaled values infinite in float32."""
    case_dir = copy_case(ws)
    t1 = case_dir / "P_t1.nii.gz"
    write_nifti_raw(t1, IMAGES["t1"].astype(np.int16), slope=1e38)
    out = ws.out.with_suffix(".nii.gz")
    return FuzzCase(["labels", case_dir, "-o", out], str(t1), [out], "infinite")


@case
def header_scl_slope_overflow_labels(ws):
    path = write_nifti_raw(ws.tmp / "slope.nii.gz", SEG.astype(np.int16), slope=1e38)
    return labels_run(ws, path)


@case
def header_pixdim_zero_case(ws):
    case_dir = copy_case(ws)
    t1 = case_dir / "P_t1.nii.gz"
    write_nifti_raw(t1, IMAGES["t1"].astype(np.int16), pixdim=(0.0, 0.0, 0.0))
    out = ws.out.with_suffix(".nii.gz")
    return FuzzCase(["labels", case_dir, "-o", out], str(t1), [out])


@case
def case_all_zero_images(ws):
    """Four all-zero modalities with a tumour segmentation: not a brain."""
    case_dir = copy_case(ws)
    for modality in IMAGES:
        write_volume(np.zeros_like(IMAGES[modality]), case_dir / f"P_{modality}.nii.gz")
    out = ws.out.with_suffix(".nii.gz")
    return FuzzCase(["labels", case_dir, "-o", out], str(case_dir), [out])


@case
def case_all_zero_t1(ws):
    case_dir = copy_case(ws)
    write_volume(np.zeros_like(IMAGES["t1"]), case_dir / "P_t1.nii.gz")
    out = ws.out.with_suffix(".nii.gz")
    return FuzzCase(["labels", case_dir, "-o", out], str(case_dir / "P_t1.nii.gz"), [out])


@case
def case_constant_t1(ws):
    """A T1 of one value everywhere: no tissue contrast, so no anatomy (it became 100 % CSF)."""
    case_dir = copy_case(ws)
    write_volume(np.full_like(IMAGES["t1"], 500), case_dir / "P_t1.nii.gz")
    out = ws.out.with_suffix(".nii.gz")
    case = FuzzCase(["labels", case_dir, "-o", out], str(case_dir / "P_t1.nii.gz"), [out])
    case.words = "no contrast"
    return case


@case
def case_folder_is_a_file(ws):
    path = ws.tmp / "case.txt"
    path.write_text("x")
    return FuzzCase(["info", path], str(path))


# --- wrong JSON shapes -----------------------------------------------------------------------------


def _sidecar_case(ws: Workspace, text: str | bytes) -> FuzzCase:
    path = copy_labels(ws)
    sidecar = path.with_name("labels.json")
    sidecar.write_bytes(text if isinstance(text, bytes) else text.encode())
    result = labels_run(ws, path)
    result.named = str(sidecar)
    return result


for _name, _text in {"list": "[]", "string": '"x"', "null": "null", "history_int": '{"history": 5}',
                     "history_items": '{"history": [1, "a"]}', "schema_string": '{"schema_version": "x"}',
                     "history_dict": '{"history": {"a": 1}}', "not_utf8": b"\xff\xfe{\x00"}.items():
    def _build(ws, _text=_text):
        return _sidecar_case(ws, _text)

    _build.__name__ = f"sidecar_{_name}"
    case(_build)


def _config_case(ws: Workspace, config) -> FuzzCase:
    model = copy_model(ws)
    path = model / "config.json"
    path.write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
    result = synth_run(ws, model=model)
    result.named = str(path)
    return result


def _good_config(ws: Workspace) -> dict:
    return json.loads((ws.model / "config.json").read_text())


_CONFIG_VARIANTS: dict[str, Callable[[dict], object]] = {
    "list": lambda c: [],
    "string": lambda c: "model",
    "network_list": lambda c: dict(c, network=[]),
    "network_channels_string": lambda c: dict(c, network=dict(c["network"], channels="abc")),
    "network_channels_negative": lambda c: dict(c, network=dict(c["network"], channels=[-4, 8])),
    "network_strides_zero": lambda c: dict(c, network=dict(c["network"], strides=[0])),
    "network_missing": lambda c: {k: v for k, v in c.items() if k != "network"},
    "intensity_missing": lambda c: {k: v for k, v in c.items() if k != "intensity"},
    "intensity_list": lambda c: dict(c, intensity=[]),
    "intensity_nan": lambda c: dict(c, intensity={m: {"low": float("nan"), "high": 1.0} for m in c["intensity"]}),
    "intensity_string": lambda c: dict(c, intensity={m: {"low": "a", "high": 1.0} for m in c["intensity"]}),
    "intensity_inverted": lambda c: dict(c, intensity={m: {"low": 5.0, "high": 5.0} for m in c["intensity"]}),
    "intensity_floor_negative": lambda c: dict(c, intensity={m: {"mean": 500.0, "std": 100.0, "scale": 15.0,
                                                                   "kind": "tissue_zscore", "floor": -1.0}
                                                               for m in c["intensity"]}),
    "intensity_floor_above_range": lambda c: dict(c, intensity={m: {"mean": 500.0, "std": 100.0, "scale": 15.0,
                                                                      "kind": "tissue_zscore", "floor": 2500.0}
                                                                  for m in c["intensity"]}),
    "intensity_floor_string": lambda c: dict(c, intensity={m: {"mean": 500.0, "std": 100.0, "scale": 15.0,
                                                                 "kind": "tissue_zscore", "floor": "dark"}
                                                             for m in c["intensity"]}),
    "sha_int": lambda c: dict(c, weights_sha256=5),
    "name_list": lambda c: dict(c, name=[1]),
    "modalities_wrong": lambda c: dict(c, network=dict(c["network"], modalities=["t1"])),
    "not_utf8": lambda c: b"\xff\xfe\x00",
}
for _name, _variant in _CONFIG_VARIANTS.items():
    def _build(ws, _variant=_variant):
        return _config_case(ws, _variant(_good_config(ws)))

    _build.__name__ = f"model_config_{_name}"
    case(_build)


def _rewrite_weights(model: Path, data: bytes) -> None:
    """Replace the weights and update the config's sha256 (a consistent but bad model)."""
    import hashlib

    (model / "weights.safetensors").write_bytes(data)
    path = model / "config.json"
    config = json.loads(path.read_text())
    config["weights_sha256"] = hashlib.sha256(data).hexdigest()
    path.write_text(json.dumps(config))


@case
def weights_truncated(ws):
    model = copy_model(ws)
    data = (model / "weights.safetensors").read_bytes()
    _rewrite_weights(model, data[: len(data) // 2])
    return synth_run(ws, model=model)


@case
def weights_garbage(ws):
    model = copy_model(ws)
    _rewrite_weights(model, os.urandom(4096))
    return synth_run(ws, model=model)


@case
def weights_huge_header_length(ws):
    model = copy_model(ws)
    _rewrite_weights(model, struct.pack("<Q", 1 << 60) + b"{}")
    return synth_run(ws, model=model)


@case
def weights_pickle_renamed(ws):
    import io

    import torch

    from safetensors.torch import load_file

    model = copy_model(ws)
    buffer = io.BytesIO()
    torch.save(load_file(str(model / "weights.safetensors")), buffer)
    _rewrite_weights(model, buffer.getvalue())
    return synth_run(ws, model=model)


@case
def weights_nan(ws):
    from safetensors.torch import load_file, save

    model = copy_model(ws)
    state = load_file(str(model / "weights.safetensors"))
    first = sorted(state)[0]
    state[first] = state[first].clone().fill_(float("nan"))
    _rewrite_weights(model, save(state))
    return synth_run(ws, model=model)


@case
def weights_wrong_shapes(ws):
    """A config whose channels do not match the stored tensors."""
    model = copy_model(ws)
    path = model / "config.json"
    config = json.loads(path.read_text())
    config["network"]["channels"] = [6, 10]
    path.write_text(json.dumps(config))
    result = synth_run(ws, model=model)
    return result


def _registry_case(ws: Workspace, registry) -> FuzzCase:
    root = ws.tmp / "models"
    root.mkdir()
    path = root / "registry.json"
    path.write_bytes(registry if isinstance(registry, bytes) else json.dumps(registry).encode())
    return FuzzCase(["synthesize", ws.labels, "-o", ws.out, "--device", "cpu"], str(path), [ws.out])


_REGISTRY_VARIANTS = {
    "list": [], "string": "x", "models_list": {"default": "a", "models": []},
    "entry_int": {"default": "a", "models": {"a": 5}}, "entry_no_path": {"default": "a", "models": {"a": {}}},
    "default_int": {"default": 5, "models": {}}, "path_escape": {"default": "a", "models": {"a": {
        "path": "../../../../etc", "sha256": "0" * 64}}}, "not_utf8": b"\xff\xfe",
}
for _name, _variant in _REGISTRY_VARIANTS.items():
    def _build(ws, _variant=_variant):
        return _registry_case(ws, _variant)

    _build.__name__ = f"registry_{_name}"
    case(_build)


def _train_config_case(ws: Workspace, config, named: str | None = None) -> FuzzCase:
    path = ws.tmp / "config.json"
    path.write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
    run = ws.tmp / "run"
    return FuzzCase(["train", "--data", ws.data, "-o", run, "--config", path, "--device", "cpu"],
                    named or str(path), [run])


TINY_TRAIN = {"network": {"channels": [4, 8], "strides": [2], "num_res_units": 1, "disc_channels": 4,
                          "disc_layers": 2}, "patch_size": 16, "steps": 2, "checkpoint_every": 1, "val_every": 2,
              "log_every": 1, "threads": 1, "precision": "fp32"}

_TRAIN_VARIANTS: dict[str, object] = {
    "list": [], "string": "x", "number": 3, "steps_string": dict(TINY_TRAIN, steps="ten"),
    "steps_zero": dict(TINY_TRAIN, steps=0), "steps_negative": dict(TINY_TRAIN, steps=-3),
    "steps_float": dict(TINY_TRAIN, steps=2.5), "lr_string": dict(TINY_TRAIN, lr="fast"),
    "lr_negative": dict(TINY_TRAIN, lr=-1.0), "lr_nan": dict(TINY_TRAIN, lr=float("nan")),
    "betas_int": dict(TINY_TRAIN, betas=5), "betas_strings": dict(TINY_TRAIN, betas=["a", "b"]),
    "network_list": dict(TINY_TRAIN, network=[]), "channels_string": dict(TINY_TRAIN, network=dict(
        TINY_TRAIN["network"], channels="abc")), "patch_zero": dict(TINY_TRAIN, patch_size=0),
    "batch_zero": dict(TINY_TRAIN, batch_size=0), "val_cases_string": dict(TINY_TRAIN, val_cases="P"),
    "flip_string": dict(TINY_TRAIN, flip="yes"), "checkpoint_every_zero": dict(TINY_TRAIN, checkpoint_every=0),
    "threads_string": dict(TINY_TRAIN, threads="two"), "seed_huge": dict(TINY_TRAIN, seed=2 ** 80),
    "huge_channels": dict(TINY_TRAIN, network=dict(TINY_TRAIN["network"], channels=[1000000, 2000000])),
    "precision_bad": dict(TINY_TRAIN, precision="fp8"), "not_utf8": b"\xff\xfe",
}
for _name, _variant in _TRAIN_VARIANTS.items():
    def _build(ws, _variant=_variant):
        return _train_config_case(ws, _variant)

    _build.__name__ = f"train_config_{_name}"
    case(_build)


def _resume_case(ws: Workspace, edit: Callable[[Path], Path]) -> FuzzCase:
    """A run folder with a checkpoint, damaged by ``edit`` (which returns the file to name)."""
    run = ws.tmp / "run"
    shutil.copytree(ws.data.parent / "run_with_checkpoint", run)
    named = edit(run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = FuzzCase(["train", "--data", ws.data, "-o", run, "--resume", "--device", "cpu"], str(named))
    result.unchanged = before  # type: ignore[attr-defined]
    return result


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


_RESUME_VARIANTS: dict[str, Callable[[Path], Path]] = {
    "latest_list": lambda run: _write(run / "checkpoints" / "latest.json", "[]"),
    "latest_escape": lambda run: _write(run / "checkpoints" / "latest.json", '{"step": 1, "path": "../../.."}'),
    "latest_absolute": lambda run: _write(run / "checkpoints" / "latest.json", '{"step": 1, "path": "/etc"}'),
    "latest_int_path": lambda run: _write(run / "checkpoints" / "latest.json", '{"step": 1, "path": 5}'),
    "latest_missing_folder": lambda run: _write(run / "checkpoints" / "latest.json",
                                                '{"step": 1, "path": "step_0000099"}'),
    "state_list": lambda run: _write(next((run / "checkpoints").glob("step_*")) / "state.json", "[]"),
    "generator_garbage": lambda run: _write(next((run / "checkpoints").glob("step_*")) / "generator.safetensors",
                                            "garbage"),
    "train_config_list": lambda run: _write(run / "train_config.json", "[]"),
    "train_config_bad_config": lambda run: _write(run / "train_config.json", '{"config": {"steps": "x"}}'),
}
for _name, _variant in _RESUME_VARIANTS.items():
    def _build(ws, _variant=_variant):
        return _resume_case(ws, _variant)

    _build.__name__ = f"resume_{_name}"
    case(_build)


@case
def train_data_empty_folder(ws):
    data = ws.tmp / "empty"
    data.mkdir()
    run = ws.tmp / "run"
    return FuzzCase(["train", "--data", data, "-o", run, "--device", "cpu"], str(data), [run])


@case
def train_data_bad_case(ws):
    """A case whose T1 is garbage: data errors must not leave a run folder behind."""
    data = ws.tmp / "data"
    case_dir = Path(shutil.copytree(ws.case, data / "P"))
    (case_dir / "P_t1.nii.gz").write_bytes(b"garbage")
    config = ws.tmp / "config.json"
    config.write_text(json.dumps(TINY_TRAIN))
    run = ws.tmp / "run"
    return FuzzCase(["train", "--data", data, "-o", run, "--config", config, "--device", "cpu"],
                    str(case_dir / "P_t1.nii.gz"), [run])


def _study_case(ws: Workspace, config) -> FuzzCase:
    path = ws.tmp / "study.json"
    path.write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
    out = ws.tmp / "report"
    return FuzzCase(["study", "--data", ws.data, "-o", out, "--config", path, "--device", "cpu"], str(path),
                    [out, ws.tmp / "report.cache"])


_STUDY_VARIANTS: dict[str, object] = {
    "list": [], "grid_list": {"grid": []}, "grid_spacing_tiny": {"grid": {"spacing_mm": 0.001}},
    "grid_spacing_string": {"grid": {"spacing_mm": "x"}}, "grid_spacing_nan": {"grid": {"spacing_mm": float("nan")}},
    "folds_string": {"folds": "two"}, "gan_list": {"gan": []}, "gan_steps_string": {"gan": {"steps": "x"}},
    "synthetic_list": {"synthetic": []}, "segmenter_list": {"segmenter": []}, "bootstrap_string": {"bootstrap": "x"},
    "margin_huge": {"grid": {"margin_mm": 1e9}}, "not_utf8": b"\xff",
}
for _name, _variant in _STUDY_VARIANTS.items():
    def _build(ws, _variant=_variant):
        return _study_case(ws, _variant)

    _build.__name__ = f"study_config_{_name}"
    case(_build)


# --- hostile command-line arguments ----------------------------------------------------------------


def _arg_case(argv_of: Callable[[Workspace], list], named: str, outputs_of=lambda ws: []) -> Builder:
    def build(ws):
        return FuzzCase(argv_of(ws), named, outputs_of(ws))

    return build


_out_nii = lambda ws: ws.out.with_suffix(".nii.gz")  # noqa: E731
_ARG_CASES: dict[str, tuple] = {
    "synthesize_seed_huge": (lambda ws: ["synthesize", ws.labels, "-o", ws.out, "--model", ws.model, "--device",
                                         "cpu", "--seed", str(2 ** 70)], "--seed", lambda ws: [ws.out]),
    "synthesize_seed_negative": (lambda ws: ["synthesize", ws.labels, "-o", ws.out, "--model", ws.model,
                                             "--device", "cpu", "--seed", "-1"], "--seed", lambda ws: [ws.out]),
    "synthesize_device_bogus": (lambda ws: ["synthesize", ws.labels, "-o", ws.out, "--model", ws.model,
                                            "--device", "tpu"], "tpu", lambda ws: [ws.out]),
    "synthesize_precision_bogus": (lambda ws: ["synthesize", ws.labels, "-o", ws.out, "--model", ws.model,
                                               "--device", "cpu", "--precision", "fp4"], "fp4", lambda ws: [ws.out]),
    "synthesize_output_is_file": (lambda ws: ["synthesize", ws.labels, "-o", ws.labels, "--model", ws.model],
                                  "labels.nii.gz", lambda ws: []),
    "tumor_new_seed_huge": (lambda ws: ["tumor", "new", ws.labels, "--center", "0", "0", "0", "--radius", "5",
                                        "--seed", str(2 ** 70), "-o", _out_nii(ws)], "--seed",
                            lambda ws: [_out_nii(ws)]),
    "tumor_random_seed_huge": (lambda ws: ["tumor", "random", ws.labels, "--seed", str(2 ** 64), "-o",
                                           _out_nii(ws)], "--seed", lambda ws: [_out_nii(ws)]),
    "tumor_output_png": (lambda ws: ["tumor", ws.labels, "--translate", "1", "0", "0", "-o", ws.tmp / "x.png"],
                         "x.png", lambda ws: [ws.tmp / "x.png"]),
    "tumor_output_txt": (lambda ws: ["tumor", ws.labels, "--translate", "1", "0", "0", "-o", ws.tmp / "x.txt"],
                         "x.txt", lambda ws: [ws.tmp / "x.txt"]),
    "tumor_output_no_suffix": (lambda ws: ["tumor", ws.labels, "--translate", "1", "0", "0", "-o", ws.tmp / "x"],
                               "x", lambda ws: [ws.tmp / "x"]),
    "labels_output_png": (lambda ws: ["labels", ws.case, "-o", ws.tmp / "x.png"], "x.png",
                          lambda ws: [ws.tmp / "x.png"]),
    "tumor_translate_nan": (lambda ws: ["tumor", ws.labels, "--translate", "nan", "0", "0", "-o", _out_nii(ws)],
                            "--translate", lambda ws: [_out_nii(ws)]),
    "tumor_translate_two": (lambda ws: ["tumor", ws.labels, "--translate", "1", "0", "-o", _out_nii(ws)],
                            "--translate", lambda ws: [_out_nii(ws)]),
    "train_steps_zero": (lambda ws: ["train", "--data", ws.data, "-o", ws.tmp / "run", "--steps", "0"],
                         "--steps", lambda ws: [ws.tmp / "run"]),
    "train_steps_negative": (lambda ws: ["train", "--data", ws.data, "-o", ws.tmp / "run", "--steps", "-4"],
                             "--steps", lambda ws: [ws.tmp / "run"]),
    "train_threads_zero": (lambda ws: ["train", "--data", ws.data, "-o", ws.tmp / "run", "--threads", "0"],
                           "--threads", lambda ws: [ws.tmp / "run"]),
    "train_data_missing": (lambda ws: ["train", "--data", ws.tmp / "none", "-o", ws.tmp / "run"], "none",
                           lambda ws: [ws.tmp / "run"]),
    "train_init_missing": (lambda ws: ["train", "--data", ws.data, "-o", ws.tmp / "run", "--init",
                                       str(ws.tmp / "nomodel")], "nomodel", lambda ws: [ws.tmp / "run"]),
    "study_folds_zero": (lambda ws: ["study", "--data", ws.data, "-o", ws.tmp / "r", "--folds", "0"], "--folds",
                         lambda ws: [ws.tmp / "r"]),
    "study_threads_negative": (lambda ws: ["study", "--data", ws.data, "-o", ws.tmp / "r", "--threads", "-2"],
                               "--threads", lambda ws: [ws.tmp / "r"]),
    "study_config_unknown": (lambda ws: ["study", "--data", ws.data, "-o", ws.tmp / "r", "--config", "huge"],
                             "huge", lambda ws: [ws.tmp / "r"]),
    "models_register_missing": (lambda ws: ["models", "--register", ws.tmp / "nomodel", "--name", "x"], "nomodel",
                                lambda ws: []),
    "models_name_without_register": (lambda ws: ["models", "--name", "x"], "--register", lambda ws: []),
    "models_default_without_register": (lambda ws: ["models", "--default"], "--register", lambda ws: []),
    "models_register_bad_name": (lambda ws: ["models", "--register", ws.model, "--name", "../x"], "../x",
                                 lambda ws: []),
    "evaluate_missing_case": (lambda ws: ["evaluate", ws.tmp / "nocase", "--model", ws.model, "--device", "cpu",
                                          "-o", ws.tmp / "r.json"], "nocase", lambda ws: [ws.tmp / "r.json"]),
    "info_missing": (lambda ws: ["info", ws.tmp / "nocase"], "nocase", lambda ws: []),
    "export_missing": (lambda ws: ["export", ws.tmp / "nocase", "--format", "nifti", "-o", ws.tmp / "e"], "nocase",
                       lambda ws: [ws.tmp / "e"]),
    "unknown_command": (lambda ws: ["frobnicate"], "frobnicate", lambda ws: []),
    "demo_model_missing": (lambda ws: ["demo", "-o", ws.out, "--model", ws.tmp / "nomodel"], "nomodel",
                           lambda ws: [ws.out]),
    "demo_device_bogus": (lambda ws: ["demo", "-o", ws.out, "--model", ws.model, "--device", "tpu"], "tpu",
                          lambda ws: [ws.out]),
    "demo_no_default_model": (lambda ws: ["demo", "-o", ws.out], "no default model", lambda ws: [ws.out]),
    "insert_from_missing": (lambda ws: ["tumor", "insert", "--from", ws.tmp / "gone.nii.gz", "--into", ws.labels,
                                        "-o", _out_nii(ws)], "gone.nii.gz", lambda ws: [_out_nii(ws)]),
    "insert_output_png": (lambda ws: ["tumor", "insert", "--from", ws.labels, "--into", ws.labels, "-o",
                                      ws.tmp / "x.png"], "x.png", lambda ws: [ws.tmp / "x.png"]),
    "new_seed_text": (lambda ws: ["tumor", "new", ws.labels, "--center", "0", "0", "0", "--radius", "5",
                                  "--seed", "abc", "-o", _out_nii(ws)], "--seed", lambda ws: [_out_nii(ws)]),
    "new_center_inf": (lambda ws: ["tumor", "new", ws.labels, "--center", "inf", "0", "0", "--radius", "5",
                                   "-o", _out_nii(ws)], "--center", lambda ws: [_out_nii(ws)]),
    "labels_missing_output_arg": (lambda ws: ["labels", ws.case], "-o", lambda ws: []),
    "synthesize_labels_is_case_folder": (lambda ws: ["synthesize", ws.case, "-o", ws.out, "--model", ws.model],
                                         str(Path("P")), lambda ws: [ws.out]),
    "evaluate_output_png_model_missing": (lambda ws: ["evaluate", ws.case, "--model", ws.tmp / "nomodel",
                                                      "-o", ws.tmp / "r.json"], "nomodel",
                                          lambda ws: [ws.tmp / "r.json"]),
}
for _name, (_argv, _named, _outs) in _ARG_CASES.items():
    _build = _arg_case(_argv, _named, _outs)
    _build.__name__ = f"arg_{_name}"
    case(_build)


# --- memory: refused from headers and configs, before allocating -----------------------------------


@memory_case
def memory_nifti_1024_synthesize(ws):
    path = zero_nifti_gz(ws.tmp / "big.nii.gz", 1024)
    return FuzzCase(["synthesize", path, "-o", ws.out, "--device", "cpu", "--model", ws.model], str(path),
                    [ws.out], "memory")


@memory_case
def memory_nifti_1024_tumor(ws):
    path = zero_nifti_gz(ws.tmp / "big.nii.gz", 1024)
    result = labels_run(ws, path)
    result.words = "memory"
    return result


@memory_case
def memory_nifti_512_synthesize(ws):
    path = sparse_nifti(ws.tmp / "big512.nii", 512)
    return FuzzCase(["synthesize", path, "-o", ws.out, "--device", "cpu", "--model", ws.model], str(path),
                    [ws.out], "memory")


@memory_case
def memory_mha_dev_zero(ws):
    path = ws.tmp / "zero.mhd"
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 2000 2000 2000\nElementType = MET_UCHAR\n"
                    "ElementDataFile = /dev/zero\n")
    return labels_run(ws, path)


@memory_case
def memory_mha_dev_zero_small(ws):
    """/dev/zero as the data of a small image: not a regular file, refused as such."""
    path = ws.tmp / "zero_small.mhd"
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 40 48 44\nElementType = MET_UCHAR\n"
                    "ElementDataFile = /dev/zero\n")
    return labels_run(ws, path)


@memory_case
def memory_model_million_channels(ws):
    model = copy_model(ws)
    path = model / "config.json"
    config = json.loads(path.read_text())
    config["network"]["channels"] = [1000000, 1000000]
    path.write_text(json.dumps(config))
    result = synth_run(ws, model=model)
    result.named = str(path)
    return result


@memory_case
def memory_train_million_channels(ws):
    result = _train_config_case(ws, dict(TINY_TRAIN, network=dict(TINY_TRAIN["network"],
                                                                  channels=[1000000, 1000000])))
    return result
