"""Shared fixtures: where the real data lives, and small synthetic cases.

Tests that need the real BraTS cases skip with a reason when the folder is
absent, except under CI (``CI=true``), where its absence is a failure.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]


def load_benchmark(name: str, folder: str = "benchmarks") -> ModuleType:
    """Import ``REPO/folder/name.py`` (a script, not a package) so a test can call its functions.

    The script's folder goes on ``sys.path`` first, since some scripts import their siblings.
    """
    directory = REPO / folder
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
    spec = importlib.util.spec_from_file_location(name, directory / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_configure(config):
    """One thread per pytest-xdist worker for torch, OpenMP/MKL and ITK (and their subprocesses).

    The suite runs with ``-n 2`` on 2 cores: two workers with one thread each fill the cores,
    where each worker's own thread pool would make four threads compete for two.  Set before any
    test module imports torch, so its thread pool starts with one thread.
    """
    if os.environ.get("PYTEST_XDIST_WORKER"):
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
            os.environ.setdefault(name, "1")
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    # What MedSynth keeps in the user's folder (generate's source-id keys) goes to the session's own folder, not
    # the home of whoever runs the tests; a test that needs another one sets MEDSYNTH_HOME itself.
    if "MEDSYNTH_HOME" not in os.environ:
        home = Path(tempfile.mkdtemp(prefix="medsynth-home-"))
        os.environ["MEDSYNTH_HOME"] = str(home)
        config.add_cleanup(lambda: shutil.rmtree(home, ignore_errors=True))


#: Test files from the longest to the shortest (measured with ``--durations``; the rest follow in
#: their usual order).  ``--dist loadfile`` hands files out in collection order, so the longest
#: ones start first and the two workers end together instead of one finishing a long file alone.
LONGEST_FILES_FIRST = ("test_generate.py", "test_labels_and_cases.py", "test_training.py", "test_slicer_logic.py",
                       "test_anatomy.py", "test_study.py", "test_study_nnunet.py", "test_slicer_module.py", "test_image_checks.py",
                       "test_fuzz.py", "test_web_review.py", "test_slicer_worker.py", "test_provenance.py")


def pytest_collection_modifyitems(config, items):
    """Order the files longest first (see :data:`LONGEST_FILES_FIRST`); tests keep their order in a file."""
    rank = {name: index for index, name in enumerate(LONGEST_FILES_FIRST)}
    items[:] = sorted(items, key=lambda item: rank.get(item.path.name, len(rank)))


def data_root() -> Path:
    return Path(os.environ.get("MEDSYNTH_DATA", REPO.parent / "shared" / "data"))


def _require(path: Path) -> Path:
    if path.exists():
        return path
    message = f"real data not found at {path} (set MEDSYNTH_DATA or place ../shared/data)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " - required under CI")
    pytest.skip(message)


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The shared real-data folder (skip, or fail under CI, when missing)."""
    return _require(data_root())


@pytest.fixture(scope="session")
def brats_cases(real_data: Path) -> list[Path]:
    """The complete BraTS 2021 case folders."""
    cases = sorted(p for p in (real_data / "brats2021" / "cases").glob("BraTS2021_*") if p.is_dir())
    if not cases:
        _require(real_data / "brats2021" / "cases" / "BraTS2021_*")
    return cases


@pytest.fixture(scope="session")
def derived_case(tmp_path_factory):
    """``derived_case(folder)``: a real case read once and its label map derived once per session.

    Returns (Case, LabelMap, seconds the derivation took) with the default anatomy model; the same
    folder asked again returns the same objects.  An atlas-EM derivation of a full-size case (about
    8 s of CPU) is the slowest step of the suite, and several test modules check properties of the
    same cases' label maps.  Under pytest-xdist the workers share one derivation per case: the first
    worker to ask writes it as a MedSynth label map (NIfTI + sidecar) into the session's common
    temporary folder under a file lock, the others read it back.  Tests must not modify what they get.
    """
    import dataclasses
    import json
    import time

    from filelock import FileLock

    from MedSynthLib.cases.anatomy import derive_label_map
    from MedSynthLib.cases.readers import read_case
    from MedSynthLib.schema.labelmap import read_label_map, write_label_map

    derived: dict[Path, tuple] = {}
    # Only under xdist is the parent of the worker's temporary folder this session's own.
    shared = (tmp_path_factory.getbasetemp().parent / "derived_cases"
              if os.environ.get("PYTEST_XDIST_WORKER") else None)

    def derive_here(case) -> tuple:
        start = time.perf_counter()
        labelmap = derive_label_map(case)
        return labelmap, time.perf_counter() - start

    def derive(folder: Path) -> tuple:
        folder = Path(folder).resolve()
        if folder not in derived:
            case = read_case(folder)
            if shared is None:
                labelmap, seconds = derive_here(case)
            else:
                shared.mkdir(parents=True, exist_ok=True)
                stored = shared / f"{folder.parent.name}_{folder.name}_labels.nii.gz"
                timing = stored.with_name(stored.name.replace(".nii.gz", "_seconds.json"))
                with FileLock(str(stored) + ".lock"):
                    if stored.exists():
                        # Reading measures a privacy record; a fresh derivation carries none.
                        labelmap = dataclasses.replace(read_label_map(stored), privacy=None)
                        seconds = json.loads(timing.read_text())["seconds"]
                    else:
                        labelmap, seconds = derive_here(case)
                        write_label_map(labelmap, stored)
                        timing.write_text(json.dumps({"seconds": seconds}))
            derived[folder] = (case, labelmap, seconds)
        return derived[folder]

    return derive


@pytest.fixture(scope="session")
def brats_derived(brats_cases: list[Path], derived_case) -> dict[str, tuple]:
    """Each real BraTS 2021 case read once and its label map derived once (``derived_case``).

    Folder name -> (Case, LabelMap, seconds the derivation took).
    """
    return {folder.name: derived_case(folder) for folder in brats_cases}


# Three phantom patients in BraTS 2021 naming; the last is the validation case of the training tests.
PHANTOM_BRATS_IDS = ("BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002")


def write_phantom_case(root: Path, seed: int, case_id: str | None = None) -> Path:
    """A phantom case folder in BraTS 2021 naming (four contrasts and the expert segmentation)."""
    case_id = case_id or f"BraTS2021_{seed:05d}"
    images, seg = phantom(seed=seed)
    for modality, array in images.items():
        write_volume(array, root / case_id / f"{case_id}_{modality}.nii.gz")
    write_volume(seg, root / case_id / f"{case_id}_seg.nii.gz")
    return root / case_id


@pytest.fixture(scope="session")
def phantom_brats(tmp_path_factory) -> Path:
    """Three phantom case folders in BraTS 2021 naming (seeds 0, 1, 2), written once per session."""
    root = tmp_path_factory.mktemp("phantom_brats") / "cases"
    for seed, case_id in enumerate(PHANTOM_BRATS_IDS):
        write_phantom_case(root, seed, case_id)
    return root


def training_cache_of(cases: Path) -> Path:
    """The cache of prepared cases (``medsynth train --cache``) shared by every training run on ``cases``.

    Entries are keyed by the case files' sha256, the anatomy model and the normalisation, so a run
    with other settings adds its own entries and never reads another's.  Deriving a phantom's anatomy
    (atlas-prior EM) is most of a tiny run's time; without a shared cache every run repeats it.
    """
    return cases.parent / "training_cache"


@pytest.fixture()
def torch_threads():
    """Restores torch's thread count after a test that trains in this process (training sets it)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def write_volume(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                 direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> Path:
    """Write a (k, j, i) array as an image with the given geometry."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection([float(v) for v in direction])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=str(path).endswith(".gz"))
    return path


def phantom(shape=(40, 48, 44), seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A small skull-stripped 'brain': four int16 modalities and a BraTS-2021 segmentation.

    T1 has CSF < GM < WM in layered shells plus noise; a tumour sits off-centre.
    """
    rng = np.random.default_rng(seed)
    k, j, i = np.indices(shape, dtype=float)
    c = np.array(shape) / 2.0
    r = np.sqrt(((k - c[0]) / (shape[0] * 0.42)) ** 2 + ((j - c[1]) / (shape[1] * 0.42)) ** 2
                + ((i - c[2]) / (shape[2] * 0.42)) ** 2)
    brain = r < 1.0
    t1 = np.zeros(shape)
    t1[brain] = 900.0                      # WM
    t1[(r >= 0.7) & brain] = 650.0         # GM shell
    t1[(r >= 0.9) & brain] = 300.0         # CSF rim
    t1[(r < 0.15)] = 300.0                 # a 'ventricle'
    t1 += rng.normal(0, 25, shape) * brain
    t1 = np.where(brain, np.maximum(t1, 1), 0)
    seg = np.zeros(shape, np.uint8)
    rt = np.sqrt((k - c[0]) ** 2 + (j - c[1] - 8) ** 2 + (i - c[2] - 6) ** 2)
    seg[(rt < 7) & brain] = 2
    seg[(rt < 4.5) & brain] = 4
    seg[(rt < 2.5) & brain] = 1
    images = {
        "t1": t1.astype(np.int16),
        "t1ce": np.where(seg == 4, 1500, t1).astype(np.int16),
        "t2": np.where(brain, 1600 - t1, 0).astype(np.int16),
        "flair": np.where(seg == 2, 1400, np.where(brain, 1200 - t1 * 0.5, 0)).astype(np.int16),
    }
    return images, seg


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """Run ``medsynth ARGV`` in-process: (exit status, stdout, stderr)."""
    from MedSynthLib.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_refusal(rc: int, out: str, err: str) -> str:
    """Assert a refusal as the CLI must give one (exit 2, one ``medsynth: error:`` line, no traceback); the line."""
    assert rc == 2 and out == "" and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medsynth: error:"), err
    return lines[0]


def file_tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path) -> its sha256: what "nothing written, nothing changed" compares."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def rewrite_model_config(folder: Path, config: dict) -> None:
    """Write an edited model config as MedSynth's writers do, with its checksum recomputed (a test that edits a
    config on purpose; an edit without it is refused on loading)."""
    import json

    from MedSynthLib.synthesis.models import with_config_sha256

    (folder / "config.json").write_text(json.dumps(with_config_sha256(config)))


def write_random_model(folder: Path, intensity: dict, seed: int) -> Path:
    """A verified model folder holding a tiny generator with random weights (channels (4, 8), one stride-2 level)
    and the given per-contrast ``intensity`` normalisers: meaningless images, every path of a trained model's."""
    import torch

    from MedSynthLib.synthesis.models import write_model
    from MedSynthLib.synthesis.networks import Generator, NetworkConfig

    torch.manual_seed(seed)
    network = NetworkConfig(channels=(4, 8), strides=(2,), num_res_units=1, disc_channels=4, disc_layers=2)
    state = {k: v.detach().contiguous() for k, v in Generator(network).state_dict().items()}
    return write_model(folder, state, {"name": folder.name, "description": "random weights for tests",
                                       "network": network.to_json(), "intensity": intensity})


@pytest.fixture()
def sigint_as_in_a_terminal():
    """SIGINT raises KeyboardInterrupt in this process for the test, as in medsynth run from a terminal: the suite may
    run in a process that ignores SIGINT (a pytest-xdist worker, or a job a CI runner started in the background)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture()
def no_shipped_models(tmp_path, monkeypatch):
    """The shipped registry hidden, so that only the test's own ``MEDSYNTH_MODELS`` registry is seen: its listing,
    and a command that reaches for a default model that does not exist."""
    import MedSynthLib.synthesis.models as models

    empty = tmp_path / "no_shipped_models"
    empty.mkdir()
    monkeypatch.setattr(models, "shipped_models_root", lambda: empty)
    return empty
