"""Run ``medsynth generate``: check everything, then make, synthesise and write cases.

Scale without a coordinator of MedSynth's own:

* ``workers`` processes on the CPU (one model copy each, torch threads = the node's cores shared
  by all processes of all local ranks, see :func:`plan_processes`);
* one process per GPU when CUDA is present (``device`` auto or cuda);
* under ``torchrun`` every rank takes the indices i with i % WORLD_SIZE == RANK (environment
  ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``); whichever rank finds all cases on disk at its
  end writes ``dataset.json`` and the card (idempotent: both come from the files on disk).

Resumable: case i is complete when ``provenance/<case>.json`` exists (written last, see
:mod:`.layouts`); a rerun with the same settings skips complete cases and redoes the rest.  The
source ids it records are keyed (:mod:`.keys`): a resume needs the key the run began with.

The anatomy cache (each patient source's derived label map) never lies inside the dataset: by default it is
the user's :func:`default_cache`, shared by every run (its names are content hashes, so a run reads only
what its own sources give).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..schema.errors import InputError, MedSynthError, OutputExistsError
from ..schema.review import GENERATE_PROVENANCE_DIR, GENERATE_RUN_FILE
from ..schema.volume_io import check_folder_argument, check_not_an_input, enclosing_folder
from .card import CARD_FIGURE, CARD_JSON, CARD_README
from .keys import HOME_ENV, SourceKey, user_dir
from .layouts import Layout, commit_staged, dataset_json, encode_images, write_case_files
from .sampler import Sources, check_config_fits_sources, draw_case, load_config, privacy
from .sources import (TEMPLATE_ID, Source, find_sources, load_source, prepare_case, prepare_tumour, template_source,
                      tumour_stats, with_dataset_ids)

# Where a dataset keeps its run record and case records: review and the reader study find them by these names.
RUN_FILE = GENERATE_RUN_FILE
PROVENANCE_DIR = GENERATE_PROVENANCE_DIR
STAGING_DIR = ".staging"
#: Where MedSynth before the cache moved out of the dataset kept its default cache (``OUT/.cache``): a resume moves
#: generate's own files from there into the cache in use.
CACHE_DIR = ".cache"
#: The default anatomy cache's folder in the user's MedSynth folder (beside ``generate-keys``).
USER_CACHE_FOLDER = "generate-cache"
RUN_VERSION = 1
#: ``--seed`` takes [0, 2**32): numpy's and torch's seeds, as MedSynth records them (the CLI's range).
SEED_LIMIT = 2 ** 32
#: The nnU-Net dataset id / MSD task number of a run not given one (recorded for the BraTS layouts too, which use none).
DEFAULT_DATASET_ID = 501
#: The run file's key id of the dataset's source ids (absent where no patient source was read).
SOURCE_KEY = "source_key"


@dataclass
class GenerateOptions:
    """Everything ``medsynth generate`` takes (see the CLI's help)."""

    n: int
    output: Path
    labels_from: Sequence[Path] = ()
    template: bool = False
    edits: Path | None = None
    model: str | None = None
    layout: str = "nnunet"
    dataset_id: int | None = None  # None: DEFAULT_DATASET_ID; refused with a BraTS layout, which has no dataset folder
    name: str = "BrainTumourSynth"
    workers: int = 1
    seed: int = 0
    #: How far each case's appearance code reaches from the model's mean appearance (``--appearance-spread``).
    appearance_spread: float = 1.0
    label_convention: str | None = None  # tumour values of the tumour-only label maps; None: detected per map
    anonymous: bool = False
    device: str = "auto"
    precision: str = "auto"
    cache: Path | None = None
    overwrite: bool = False
    progress: bool = True
    #: The command as the user typed it, paths hidden (``card.card_command``): the dataset card's "Command" line.
    command: str = ""
    log: Callable[[str], None] = field(default=lambda message: print(message, file=sys.stderr))


def default_cache() -> Path:
    """The anatomy cache of a run not given ``--cache``: ``generate-cache`` in the user's MedSynth folder.

    Outside the dataset: the cache holds every patient source's label map under names that anyone with MedSynth
    and the source files can compute, and a dataset is made to be shared.
    """
    return user_dir() / USER_CACHE_FOLDER


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment, (0, 1, 0) without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return rank, world, int(os.environ.get("LOCAL_RANK", str(rank)))


@dataclass(frozen=True)
class ProcessPlan:
    """Where this rank runs its cases.

    Attributes:
        devices: the device of each process that runs cases: one entry means this process
            itself, more mean a pool of worker processes (one model copy each).
        threads: torch threads per process on the CPU (``None``: leave torch's setting).
    """

    devices: tuple[str, ...]
    threads: int | None

    @property
    def processes(self) -> int:
        return len(self.devices)


def plan_processes(device: str, workers: int, cuda_devices: Sequence[int], world: int, local_rank: int,
                   local_world: int, cpus: int) -> ProcessPlan:
    """One process per GPU, or ``workers`` CPU processes sharing this node's cores.

    * GPUs under torchrun (``world > 1``): this rank takes the GPU of its ``LOCAL_RANK`` (torchrun
      starts one rank per GPU of a node: ``--nproc_per_node`` = GPUs), modulo the GPUs it sees;
    * GPUs without torchrun: one worker process per GPU;
    * the CPU: ``workers`` processes; the node's cores are split between all processes of all
      local ranks (``LOCAL_WORLD_SIZE`` ranks x ``workers``), at least one thread each: one
      single-threaded process per core is the fastest here (measured, docs/benchmarks).
    """
    if cuda_devices:
        if world > 1:
            return ProcessPlan((f"cuda:{cuda_devices[local_rank % len(cuda_devices)]}",), None)
        return ProcessPlan(tuple(f"cuda:{d}" for d in cuda_devices), None)
    threads = max(1, cpus // max(1, workers * max(1, local_world)))
    return ProcessPlan((device,) * workers, threads)


def anonymous_config(config: dict[str, Any], has_template: bool) -> dict[str, Any]:
    """The config with every kind that cannot give an anonymous case switched off.

    Only a parametric tumour in the template is anonymous: a patient's own tumour moved
    (``transform``) and a tumour inserted into another patient's brain (``insert_brain``) keep
    that patient's brain, and a real tumour (``insert_brain``, ``insert_template``) keeps its
    patient's tumour shape.
    """
    out = json.loads(json.dumps(config))
    for kind in ("transform", "insert_brain", "insert_template"):
        out["kinds"][kind] = 0.0
    if has_template:
        out["parametric"]["p_template"] = 1.0
    else:
        out["kinds"]["parametric"] = 0.0
    if sum(out["kinds"].values()) <= 0:
        raise MedSynthError("--anonymous: the sampler config has no kind of case that can be anonymous "
                            "(a parametric tumour, with --template)")
    return out


def _provenance_path(out: Path, case_id: str) -> Path:
    return out / PROVENANCE_DIR / f"{case_id}.json"


def _check_output(out: Path, spec: dict[str, Any], overwrite: bool) -> bool:
    """Whether ``out`` resumes an earlier run; refuses another run's or a foreign folder."""
    run_file = out / RUN_FILE
    if not out.exists():
        return False
    if not out.is_dir():
        raise InputError(out, "output exists and is not a folder")
    if overwrite:
        return False
    if run_file.exists():
        previous = _read_run_file(run_file)
        different = sorted(k for k in set(spec) | set(previous) if spec.get(k) != previous.get(k))
        if different:
            raise InputError(out, f"holds a generate run with other settings ({', '.join(different)}): "
                                  "use another -o or --overwrite")
        return True
    # Under torchrun another rank may hold the run file's lock, or be writing it (its lock file, its temporary).
    if any(entry.name != CACHE_DIR and not entry.name.startswith(f".{RUN_FILE}.") for entry in out.iterdir()) \
            or not _only_cache_files(out / CACHE_DIR):
        raise OutputExistsError(out)
    return False


def _read_run_file(run_file: Path) -> dict[str, Any]:
    try:
        previous = json.loads(run_file.read_text())
    except (OSError, ValueError):
        previous = None
    if not isinstance(previous, dict):
        raise InputError(run_file, "unreadable run file (use --overwrite to start again)")
    return previous


def _run_spec(spec_base: dict[str, Any], sources: Sequence[Source], key: SourceKey | None) -> dict[str, Any]:
    spec = dict(spec_base)
    if key is not None:
        spec[SOURCE_KEY] = key.key_id
    spec["sources"] = sorted(s.source_id for s in sources)
    return spec


def _claim_run(out: Path, spec_base: dict[str, Any], sources: list[Source], layout: Layout,
               n: int) -> tuple[dict[str, Any], list[Source], bool, int]:
    """The run record of ``out``, the sources under the ids it records, whether the run resumes, and a descriptor
    holding a shared lock of the run file (close it when the run ends).

    A new run that reads a patient's source draws the key of its source ids (:mod:`.keys`) and writes the run
    file; a rerun takes the key the run file names, so its sources get the recorded ids only when they are the
    same files.  Under torchrun the ranks start unaware of each other: the first to hold the run file's lock
    writes it, and the others resume it.  Every rank holds the run file itself (a shared ``flock``, taken under the
    lock) while it runs: the rank that wrote it, failing before any case, removes it only once no other holds it
    (:func:`_undo_new_run`).
    """
    from ..schema.outputs import output_lock
    from ..schema.volume_io import write_json

    run_file = out / RUN_FILE
    patients = any(s.is_patient for s in sources)
    with output_lock(run_file):
        if run_file.exists():
            previous = _read_run_file(run_file)
            key: SourceKey | None = None
            if previous.get(SOURCE_KEY) is None and any(i != TEMPLATE_ID for i in previous.get("sources") or ()):
                raise InputError(run_file, "made before MedSynth keyed its source ids: its records name the "
                                           "patients' source files by their content hash, which anyone holding "
                                           "those files can match; generate it again with --overwrite")
            if patients and previous.get(SOURCE_KEY) is None:  # the run read no patient source, this one does
                raise InputError(out, "holds a generate run with other settings (sources): use another -o or "
                                      "--overwrite")
            if patients:
                key = SourceKey.recorded(previous[SOURCE_KEY], run_file)
            keyed = with_dataset_ids(sources, key) if key is not None else list(sources)
            spec = _run_spec(spec_base, keyed, key)
            _check_output(out, spec, False)
            _check_no_cases_beyond(out, layout, n)
            return spec, keyed, True, _hold_run_file(run_file)
        key = SourceKey.new() if patients else None
        keyed = with_dataset_ids(sources, key) if key is not None else list(sources)
        spec = _run_spec(spec_base, keyed, key)
        write_json(spec, run_file, overwrite=True)
        return spec, keyed, False, _hold_run_file(run_file)


def _hold_run_file(run_file: Path) -> int:
    import fcntl

    fd = os.open(run_file, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def _any_case_complete(out: Path) -> bool:
    folder = out / PROVENANCE_DIR
    return folder.is_dir() and any(not p.name.startswith(".") for p in folder.glob("*.json"))


def _undo_new_run(out: Path, layout: Layout, n: int, held: int, made: list[Path]) -> None:
    """Remove what a new run that failed before completing any case wrote: its run file, the files of cases cut
    before their record, and the folders it made (``made``: ``out`` and its parents, when the run created them).

    The run file would refuse the corrected command as a run "with other settings".  Under torchrun the other ranks
    hold the run file while they run: this (the rank that wrote it) waits until none does, and keeps everything
    once any rank has completed a case, which a rerun resumes.
    """
    import fcntl

    from ..schema.outputs import output_lock

    run_file = out / RUN_FILE
    os.close(held)  # this rank's own shared lock would block its exclusive one
    while not _any_case_complete(out):
        with output_lock(run_file):  # no rank is between finding the run file and holding it
            try:
                fd = os.open(run_file, os.O_RDONLY)
            except FileNotFoundError:
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # another rank still runs
            else:
                if not _any_case_complete(out):
                    run_file.unlink()
                    break
            finally:
                os.close(fd)
        time.sleep(0.5)
    else:
        return
    shutil.rmtree(out / STAGING_DIR, ignore_errors=True)
    for index in range(n):  # none has a record: files moved into place by a case cut before it
        for rel in layout.files(layout.case_id(index)).values():
            (out / rel).unlink(missing_ok=True)
    folders = [p for p in out.rglob("*") if p.is_dir() and not p.is_symlink()]
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True) + made:
        try:
            folder.rmdir()  # only when empty
        except OSError:
            pass


def _check_no_cases_beyond(out: Path, layout: Layout, n: int) -> None:
    """Refuse a rerun whose ``-n`` is below complete cases already in ``out``.

    ``dataset.json`` (nnU-Net's ``numTraining``, the MSD datalist) and the card list cases 0..n-1
    only, while ``imagesTr``/``labelsTr`` (or the BraTS case folders) would keep the others: the
    dataset's files and its ``dataset.json`` would disagree (nnU-Net's integrity check fails).
    """
    folder = out / PROVENANCE_DIR
    if not folder.is_dir():
        return
    wanted = {layout.case_id(i) for i in range(n)}
    beyond, needed = [], n
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith(".") or path.stem in wanted:
            continue
        beyond.append(path.stem)
        try:  # the case's index, as its provenance records it
            needed = max(needed, int(json.loads(path.read_text())["generation"]["index"]) + 1)
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if not beyond:
        return
    shown = ", ".join(beyond[:3]) + (", ..." if len(beyond) > 3 else "")
    listing = "dataset.json and the dataset card" if layout.dataset_dir else "the dataset card"  # BraTS: no dataset.json
    raise InputError(out, f"holds {len(beyond)} complete case(s) beyond -n {n} ({shown}), which {listing} "
                          f"would leave out: give -n {needed} or more, another -o, or --overwrite")


def check_device_and_precision(device: str, precision: str) -> None:
    """Refuse a device this machine lacks or a precision it cannot run, as the workers would, but before anything
    is written."""
    from ..synthesis.inference import pick_device, pick_precision

    if device.startswith("cuda:") and not device[len("cuda:"):].isdigit():
        raise MedSynthError(f"--device {device}: give a GPU's number, cuda:0, cuda:1 ...")
    picked = pick_device(device)
    if picked.type == "cuda" and picked.index is not None:
        import torch

        if picked.index >= torch.cuda.device_count():
            raise MedSynthError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), "
                                "numbered from cuda:0")
    pick_precision(precision, picked)


def _case_id_pattern(layout: Layout) -> re.Pattern[str]:
    """The layout's case ids, any index: every layout's id is the name, one separator, five digits, and a fixed
    ending (``-000`` for BraTS 2023)."""
    sample, at = layout.case_id(0), len(layout.name) + 1
    return re.compile(re.escape(sample[:at]) + r"\d{5}" + re.escape(sample[at + 5:]))


def _recorded_layouts(out: Path) -> list[Layout]:
    """The layouts of the run in ``out``: its run file's, else (an unreadable run file) its case records'."""
    try:
        spec = json.loads((out / RUN_FILE).read_text())
        return [Layout(spec["layout"], int(spec["dataset_id"]), spec["name"])]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    layouts = set()
    for path in sorted((out / PROVENANCE_DIR).glob("*.json")):
        try:
            record = json.loads(path.read_text())
            name = re.split(r"[_-]\d{5}", record["case_id"])[0]
            folder = next(iter(record["files"].values())).split("/")[0]
            number = re.match(r"(?:Dataset|Task)(\d+)_", folder) if record["layout"] in ("nnunet", "msd") else None
            layouts.add(Layout(record["layout"], int(number.group(1)) if number else DEFAULT_DATASET_ID, name))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration):
            continue
    return sorted(layouts, key=str)


#: What file browsers write into any folder a user opens (macOS Finder, its AppleDouble ``._NAME`` files on other
#: disks, Windows Explorer): not the user's files, so they never stop an ``--overwrite``.
_BROWSER_FILES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


def _browser_file(path: Path) -> bool:
    return path.is_file() and (path.name in _BROWSER_FILES or path.name.startswith("._"))


def not_generated(out: Path) -> list[str]:
    """What ``out`` holds that generate did not write, as paths inside it (a foreign folder named once).

    Generate writes its run file, ``provenance/``, ``.staging/``, the card files and the dataset: the nnU-Net or MSD
    dataset folder with its case files, ``dataset.json`` and README (and the MSD's empty ``imagesTs``), or the BraTS
    case folders.  Its atomic writes leave ``.NAME.*`` temporaries and locks beside those names when killed.
    """
    own_names = {RUN_FILE, PROVENANCE_DIR, STAGING_DIR, CARD_README, CARD_JSON, CARD_FIGURE}
    layouts = _recorded_layouts(out)
    patterns = [(layout, _case_id_pattern(layout)) for layout in layouts]

    def own_name(name: str, names: set[str]) -> bool:
        return name in names or any(name.startswith(f".{n}.") for n in names)

    def own_case_file(layout: Layout, pattern: re.Pattern[str], rel: str) -> bool:
        case = pattern.match(rel.rsplit("/", 1)[-1])
        return case is not None and rel in layout.files(case.group(0)).values()

    foreign: list[str] = []
    for entry in sorted(out.iterdir(), key=lambda p: p.name):
        name = entry.name
        if own_name(name, own_names) or _browser_file(entry):
            continue
        if name == CACHE_DIR:  # an older MedSynth's cache: generate's arrays only
            if not _only_cache_files(entry):
                foreign.append(name)
            continue
        owner = next(((layout, pattern) for layout, pattern in patterns
                      if name == layout.dataset_dir or (not layout.dataset_dir and pattern.fullmatch(name))), None)
        if owner is None or not entry.is_dir() or entry.is_symlink():
            foreign.append(name)
            continue
        layout, pattern = owner
        if not layout.dataset_dir:  # a BraTS case folder: its files only
            foreign += [f"{name}/{p.name}" for p in sorted(entry.iterdir())
                        if not (p.is_file() and own_case_file(layout, pattern, f"{name}/{p.name}") or _browser_file(p))]
            continue
        folders = {"imagesTr", "labelsTr"} | ({"imagesTs"} if layout.kind == "msd" else set())
        for child in sorted(entry.iterdir(), key=lambda p: p.name):
            rel = f"{name}/{child.name}"
            if child.is_file() and own_name(child.name, {"dataset.json", CARD_README}) or _browser_file(child):
                continue
            if child.name not in folders or not child.is_dir() or child.is_symlink():
                foreign.append(rel)
                continue
            foreign += [f"{rel}/{p.name}" for p in sorted(child.iterdir(), key=lambda p: p.name)
                        if not (p.is_file() and own_case_file(layout, pattern, f"{rel}/{p.name}") or _browser_file(p))]
    return foreign


def _only_cache_files(cache: Path) -> bool:
    """Whether ``cache`` is absent or holds only generate's own cache arrays.

    An older MedSynth kept its default cache in ``OUT/.cache`` (:data:`CACHE_DIR`): a folder holding only that
    is a run that stopped while reading its sources.
    """
    if not cache.exists():
        return True
    return cache.is_dir() and _only_cache_files_named(list(cache.iterdir()))


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first (what a ``mkdir -p`` would create)."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


class _UndoSourceCache:
    """Removes what reading the sources wrote (cache arrays, folders) when the run then fails on bad input.

    The sources are read and cached one by one, so a bad source found after good ones would otherwise leave
    the good ones' cache arrays (and the folders made for them) behind.  ``cache`` None: the user's default
    cache, which keeps what was derived: other runs share it and may be reading the same arrays, and it is
    nobody's output.
    """

    def __init__(self, cache: Path | None, out: Path) -> None:
        self.cache = cache
        self.folders = list(dict.fromkeys((_missing_folders(cache) if cache else []) + _missing_folders(out)))
        self.before = {p.name for p in cache.iterdir()} if cache is not None and cache.is_dir() else set()

    def __enter__(self) -> "_UndoSourceCache":
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, traceback: Any) -> None:
        if kind is None or not issubclass(kind, MedSynthError):
            return
        if self.cache is not None and self.cache.is_dir():
            for path in self.cache.iterdir():
                if path.name not in self.before and _only_cache_files_named([path]):
                    path.unlink(missing_ok=True)
        for folder in sorted(self.folders, key=lambda p: len(p.parts), reverse=True):
            try:
                folder.rmdir()  # only when empty: nothing but what this run made
            except OSError:
                pass


def _only_cache_files_named(paths: Sequence[Path]) -> bool:
    return all(p.is_file() and p.name.lstrip(".").startswith(("case-", "tumour-")) and ".npy" in p.name
               for p in paths)


def _private_folder(folder: Path) -> None:
    """Make the default cache folder readable by its user only (it holds the patients' label maps), as the keys'."""
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise InputError(folder, f"cannot write the anatomy cache ({exc.strerror}); set {HOME_ENV} to a folder "
                                 "you can write, or give --cache DIR") from None


def _move_old_cache(out: Path, cache: Path, log: Callable[[str], None] | None) -> None:
    """Move generate's own cache arrays from a dataset begun by an older MedSynth (``OUT/.cache``) into ``cache``.

    The dataset then no longer carries its patients' label maps, and its resume reads them in ``cache``.  The
    names are content hashes: an array already in ``cache`` is the same one.  Torchrun ranks may move the same
    files at once: a file another rank moved first is gone, and each move is a rename or an atomic copy.  What
    generate did not write stays, and is said.
    """
    old = out / CACHE_DIR
    if not old.is_dir() or old.is_symlink():
        return
    cache.mkdir(parents=True, exist_ok=True)
    for path in sorted(old.iterdir()):
        if not _only_cache_files_named([path]):
            continue
        try:
            if path.name.startswith("."):  # a temporary left by a killed write: never a whole array
                path.unlink()
            elif (cache / path.name).exists():
                path.unlink()
            else:
                _move_file(path, cache / path.name)
        except FileNotFoundError:
            pass
    try:
        old.rmdir()
    except FileNotFoundError:
        pass
    except OSError:
        left = ", ".join(sorted(p.name for p in old.iterdir()))
        if log:
            log(f"{old}: generate's cached label maps moved to {cache}; this folder keeps what generate did not "
                f"write ({left}): remove it before sharing the dataset")


def _move_file(source: Path, target: Path) -> None:
    try:
        os.replace(source, target)
        return
    except OSError as exc:
        import errno

        if exc.errno != errno.EXDEV:
            raise
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp.npy")  # another file system: copy, then rename
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    source.unlink(missing_ok=True)


def _placeholder_sources(cases: Sequence[Path], tumours: Sequence[Path], template: bool) -> list[Source]:
    """Stand-ins (kind only) for the config check that runs before anything is read or written."""
    wt = {"voxels": {"WT": 1}}
    out = [Source(f"case:{i}", "case", None, {}, f"case:{i}", wt) for i in range(len(cases))]
    out += [Source(f"tumour:{i}", "tumour", None, {}, f"tumour:{i}", wt) for i in range(len(tumours))]
    if template:
        out.append(Source("template", "template", None, {}, None, None))
    return out


# --- workers -------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(state: dict[str, Any], device_queue: Any = None, threads: int | None = None) -> None:
    """Load the model once per process (``device_queue`` hands each GPU process its own GPU)."""
    import torch

    from ..synthesis.models import resolve_model
    from ..synthesis.runtime import avoid_hugepage_stalls
    from ..synthesis.synthesize import SynthesisEngine

    if threads is not None:
        avoid_hugepage_stalls()
        torch.set_num_threads(max(1, int(threads)))
    device = device_queue.get() if device_queue is not None else state["device"]
    _WORKER.clear()
    _WORKER.update(state)
    _WORKER["sources"] = Sources([Source.from_json(s) for s in state["sources"]])
    _WORKER["layout"] = Layout(**state["layout"])
    card = resolve_model(state["model_path"])
    if card.sha256 != state["model_sha256"]:  # changed on disk since the run began: never mix two models' cases
        raise InputError(card.path, "the model's weights changed while the dataset was being generated")
    # By the folder, the card takes the config's name: each case names the model as the run (its registry name).
    card = dataclasses.replace(card, name=state["model_name"])
    _WORKER["engine"] = SynthesisEngine(card, device, state["precision"],
                                        appearance_spread=state["appearance_spread"])
    if _WORKER["sources"].template is not None:
        load_source(_WORKER["sources"].template)  # read the template once per process, not in a case's timing


def peak_rss_mb() -> float | None:
    """This process's peak resident memory in MB (Linux ``VmHWM``; None where /proc is absent).

    ``VmHWM`` belongs to the process's own address space, so unlike ``ru_maxrss`` it does not
    carry the peak of the parent a spawned worker was forked from.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


class _Stopwatch:
    """Wall and CPU seconds (this process, all its threads) of consecutive stages of a case."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, name: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.stages[name] = {"wall_s": round(wall - self._wall, 4), "cpu_s": round(cpu - self._cpu, 4)}
        self._wall, self._cpu = wall, cpu

    def total(self, names: Sequence[str], key: str) -> float:
        return round(sum(self.stages[n][key] for n in names), 3)


#: The coarse stages of ``timings_s`` / ``cpu_s`` and the fine stages (``stages``) each sums.
COARSE_STAGES = {"edit": ("sample", "privacy_stats"), "network": ("synthesis",),
                 "write": ("encode", "nifti", "hash")}


def _run_case(index: int) -> dict[str, Any]:
    """Make, synthesise and write case ``index`` (in the current worker).

    The provenance records the wall and CPU seconds of each stage (``stages``): ``sample``
    (drawing the label map: cached sources, edits), ``privacy_stats`` (the privacy record's
    verdict, tumour statistics), ``synthesis`` (the engine: one-hot, network, scanner units; its
    own ``timings_s.network`` is the forward pass alone), ``encode`` (int16 and the full grid),
    ``nifti`` (NIfTI + gzip of every file, renames) and ``hash`` (sha256 of what was written).
    """
    from ..schema.grid import Grid
    from ..schema.labels import Label
    from ..schema.provenance import array_sha256, file_sha256

    w = _WORKER
    out, layout, sources, engine = Path(w["output"]), w["layout"], w["sources"], w["engine"]
    case_id = layout.case_id(index)
    clock = _Stopwatch()
    labelmap, record = draw_case(index, w["seed"], w["config"], sources)
    record.pop("edits")  # the engine's provenance carries them (labelmap.history)
    clock.lap("sample")
    private = privacy(record, labelmap, sources)
    if w["anonymous"] and not private["anonymous"]:  # the config was restricted: a bug if it happens
        raise MedSynthError(f"case {index}: drawn case is not anonymous ({record['kind']})")
    stats = tumour_stats(labelmap.array, labelmap.grid, labelmap.array > Label.BACKGROUND)
    clock.lap("privacy_stats")
    result = engine.synthesize(labelmap, seed=record["edit_seed"])
    clock.lap("synthesis")
    clock.stages["synthesis"]["forward_wall_s"] = result.provenance["timings_s"]["network"]  # the network alone
    # Edited and synthesised on the brain's crop; written on the source files' own grid.
    base = sources.by_id[record["base"]]
    images = {m: base.to_full(a) for m, a in encode_images(result.images).items()}
    labels = base.to_full(labelmap.array)
    grid = Grid.from_json(base.output_grid)
    clock.lap("encode")
    staging = out / STAGING_DIR / case_id
    shutil.rmtree(staging, ignore_errors=True)
    files = write_case_files(layout, staging, case_id, images, labels, grid)
    commit_staged(staging, out)
    clock.lap("nifti")
    provenance = dict(result.provenance)
    provenance.update({
        "case_id": case_id,
        "layout": layout.kind,
        "files": files,
        "generation": record,
        "privacy": private,
        "tumour": stats,
        "grid": grid.to_json(),
        "labels_sha256": array_sha256(labels),
        "edit_grid": {"grid": labelmap.grid.to_json(), "offset_kji": list(base.offset or (0, 0, 0)),
                      "labels_sha256": result.provenance["labels_sha256"]},
        "images_sha256": {m: array_sha256(a) for m, a in images.items()},
        # What export verifies a case folder against (as a synthesize folder's provenance ``files``).
        "files_sha256": {key: file_sha256(out / rel) for key, rel in files.items()},
    })
    clock.lap("hash")
    provenance["timings_s"] = dict(provenance.get("timings_s", {}),
                                   **{k: clock.total(v, "wall_s") for k, v in COARSE_STAGES.items()})
    # CPU seconds of this process (all its threads) per stage: comparable on a machine shared with other work.
    provenance["cpu_s"] = {k: clock.total(v, "cpu_s") for k, v in COARSE_STAGES.items()}
    provenance["stages"] = clock.stages
    # The worker's own peak memory after this case: a bounded worker plateaus after its first cases.
    provenance["worker"] = {"pid": os.getpid(), "peak_rss_mb": peak_rss_mb()}
    from ..schema.volume_io import write_json

    write_json(provenance, _provenance_path(out, case_id), overwrite=True)  # the case's commit mark
    return {"index": index, "case_id": case_id, "timings_s": provenance["timings_s"]}


def _prepare_one(item: tuple[str, str, str, str | None]) -> dict[str, Any]:
    kind, path, cache, label_convention = item  # a case folder's tumour values follow its naming convention
    if kind == "case":
        return prepare_case(Path(path), Path(cache)).to_json()
    return prepare_tumour(Path(path), Path(cache), label_convention).to_json()


# --- the run -------------------------------------------------------------------------------------


def generate(options: GenerateOptions) -> dict[str, Any]:
    """Generate the dataset; returns a summary (counts, timings)."""
    from ..synthesis.appearance import check_appearance_spread, check_model_spread
    from ..synthesis.models import resolve_model

    opt = options
    if opt.n < 1:
        raise MedSynthError(f"-n must be at least 1, got {opt.n}")
    if opt.workers < 1:
        raise MedSynthError(f"--workers must be at least 1, got {opt.workers}")
    if not 0 <= int(opt.seed) < SEED_LIMIT:
        raise MedSynthError(f"--seed {opt.seed} is outside [0, 2**32)")
    check_appearance_spread(opt.appearance_spread, "--appearance-spread")
    # The workers check these when they load the model, after the run file is written: a bad value then left a run
    # that refused the corrected command as one "with other settings".
    check_device_and_precision(opt.device, opt.precision)
    dataset_id = DEFAULT_DATASET_ID if opt.dataset_id is None else opt.dataset_id
    try:
        layout = Layout(opt.layout, dataset_id, opt.name)
    except ValueError as exc:
        raise MedSynthError(str(exc)) from None
    if opt.dataset_id is not None and not layout.dataset_dir:
        raise MedSynthError(f"--dataset-id names the nnU-Net dataset or MSD task folder; the {layout.kind} layout has "
                            "none (one folder per case): leave it out")
    if not opt.labels_from and not opt.template:
        raise MedSynthError("nothing to draw from: give --labels-from DIR and/or --template")
    if opt.label_convention is not None and (opt.anonymous or not opt.labels_from):
        raise MedSynthError("--label-convention names the tumour values of --labels-from's tumour-only label maps, "
                            f"which {'--anonymous does not read' if opt.anonymous else 'are not given'}: leave it out")
    config = load_config(opt.edits)
    where = str(opt.edits) if opt.edits else "default sampler config"
    if opt.anonymous:
        config = anonymous_config(config, opt.template)
    case_dirs, tumour_files = find_sources(opt.labels_from)
    if opt.anonymous and (case_dirs or tumour_files):
        # An anonymous case uses neither a patient's brain nor a real tumour, so the patients' files are not read:
        # nothing derived from them (cached label maps, source ids, tumour statistics) reaches the dataset.
        opt.log(f"--anonymous: the {len(case_dirs) + len(tumour_files)} --labels-from source(s) are not read "
                "(an anonymous case is a parametric tumour in the template)")
        case_dirs, tumour_files = [], []
    drop = opt.edits is None  # the built-in config switches off what the sources cannot give
    config = check_config_fits_sources(config, _placeholder_sources(case_dirs, tumour_files, opt.template), where,
                                       drop)
    model = resolve_model(opt.model)
    check_model_spread(opt.appearance_spread, model, "--appearance-spread")
    rank, world, local_rank = distributed()

    out = Path(opt.output)
    cache = Path(opt.cache) if opt.cache else default_cache()
    cache_option = "--cache" if opt.cache else f"the anatomy cache ({HOME_ENV}, or give --cache DIR)"
    check_folder_argument(out, "-o")
    inputs = [Path(p) for p in opt.labels_from] + ([Path(opt.edits)] if opt.edits else [])
    check_not_an_input([out], inputs)  # --overwrite would replace the folder
    check_folder_argument(cache, cache_option)
    check_not_an_input([cache], inputs)
    for written, option in ((out, "-o"), (cache, cache_option)):  # never among the patients' own files
        inside = enclosing_folder(written, [p for p in inputs if p.is_dir()])
        if inside is not None:
            raise InputError(written, f"{option} lies inside the input {inside}: write it outside the folders "
                                      "MedSynth reads")
    if cache.resolve() == out.resolve() or enclosing_folder(cache, [out]) is not None:
        # The dataset would ship its patients' label maps, under names their files give.
        raise InputError(cache, f"{cache_option} lies inside -o {out}: the dataset would carry the patients' "
                                "label maps; keep the cache outside it")
    spec_base = {"version": RUN_VERSION, "seed": int(opt.seed), "config": config,
                 "model": {"name": model.name, "sha256": model.sha256}, "layout": layout.kind,
                 "dataset_id": int(dataset_id), "name": opt.name, "anonymous": bool(opt.anonymous),
                 "label_convention": opt.label_convention,
                 "precision": opt.precision}
    if opt.appearance_spread != 1.0:  # every earlier run drew at 1: their run.json stays resumable
        spec_base["appearance_spread"] = float(opt.appearance_spread)
    # The output check needs the source ids, which need the files read: check what can be checked first.
    if out.exists() and not (out / RUN_FILE).exists() and not opt.overwrite:
        _check_output(out, spec_base, False)
    if opt.overwrite and world > 1:
        # Ranks start at different moments: one removing the folder would delete another's cases.
        raise MedSynthError("--overwrite cannot be used under torchrun (WORLD_SIZE > 1): remove the output "
                            "folder first, or give another -o")
    if opt.overwrite and out.exists():
        if not (out / RUN_FILE).exists() and any(out.iterdir()):
            raise InputError(out, "--overwrite replaces only a folder written by medsynth generate")
        foreign = not_generated(out)
        if foreign:  # -o nnUNet_raw: the user's other datasets would go with the folder
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise InputError(out, f"--overwrite replaces the whole folder, which holds what generate did not write "
                                  f"({shown}): move that out, or give another -o")
    with _replacing(out, opt.overwrite):
        return _generate_into(out, cache, opt, layout, config, where, drop, model, spec_base, case_dirs,
                              tumour_files, rank, world, local_rank)


def _say_emulated_bf16(opt: GenerateOptions, plan: ProcessPlan) -> None:
    """The notice ``synthesize`` gives for bf16 emulated on this CPU, said once here: the workers' engines
    are made without a log."""
    from ..synthesis.inference import emulated_bf16_notice, pick_device

    if plan.devices[0].startswith("cuda"):  # a GPU computes bf16 itself: nothing to say
        return
    notice = emulated_bf16_notice(opt.precision, pick_device(plan.devices[0]))  # 'auto' on a machine without GPU
    if notice is not None and opt.log:
        opt.log(notice)


@contextlib.contextmanager
def _replacing(out: Path, overwrite: bool) -> Iterator[None]:
    """With ``overwrite`` and an existing ``out``: the old dataset moved aside, removed once the new run has
    returned, and put back when the run is cancelled or fails (it was deleted before the run began, so a
    cancelled ``--overwrite`` lost it). A run killed outright leaves it in ``.NAME.replaced-PID`` beside ``out``."""
    from ..schema.outputs import signals_deferred

    if not (overwrite and out.exists()):
        yield
        return
    aside = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    os.rename(out, aside)
    try:
        yield
    except BaseException:
        with signals_deferred():
            shutil.rmtree(out, ignore_errors=True)
            os.rename(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _generate_into(out: Path, cache: Path, opt: GenerateOptions, layout: Layout, config: dict[str, Any], where: str,
                   drop: bool, model: Any, spec_base: dict[str, Any], case_dirs: list[Path], tumour_files: list[Path],
                   rank: int, world: int, local_rank: int) -> dict[str, Any]:
    """:func:`generate` once its arguments are checked (and an old output moved aside)."""
    import multiprocessing

    # Sources: this rank's share first (other ranks derive theirs), then all (cache hits).
    items = [(kind, str(p), str(cache), opt.label_convention)
             for kind, paths in (("case", case_dirs), ("tumour", tumour_files)) for p in paths]
    plan = plan_processes(opt.device, opt.workers, _cuda_devices(opt.device), world, local_rank,
                          int(os.environ.get("LOCAL_WORLD_SIZE", "1")), os.cpu_count() or 1)
    n_procs = plan.processes
    _say_emulated_bf16(opt, plan)
    pool = None
    others = _children()
    made = _missing_folders(out)  # removed again, when empty, by a new run failing before its first case
    claim: dict[str, Any] = {}  # this rank's hold of the run file, and whether it resumes the run
    if n_procs > 1:
        pool = _process_pool(n_procs, multiprocessing.get_context("spawn"))
    try:
        return _make_cases(out, cache, opt, layout, config, where, drop, model, spec_base, items, plan, pool, others,
                           rank, world, claim)
    except BaseException:
        if claim.get("held") is not None and not claim["resuming"] and not _any_case_complete(out):
            _undo_new_run(out, layout, opt.n, claim.pop("held"), made)
        raise
    finally:
        if claim.get("held") is not None:
            os.close(claim["held"])


def _make_cases(out: Path, cache: Path, opt: GenerateOptions, layout: Layout, config: dict[str, Any], where: str,
                drop: bool, model: Any, spec_base: dict[str, Any], items: list[tuple[str, str, str, str | None]],
                plan: ProcessPlan, pool: Any, others: frozenset[Any], rank: int, world: int,
                claim: dict[str, Any]) -> dict[str, Any]:
    """:func:`_generate_into`'s sources, run file and cases (``claim`` gets the run file's hold as soon as taken)."""
    n_procs = plan.processes
    try:
        if not opt.cache and items:  # --anonymous reads no source: nothing to cache
            _private_folder(cache)
        if not opt.overwrite:  # --overwrite has moved the old dataset aside, its cache with it
            _move_old_cache(out, cache, opt.log)
        with _UndoSourceCache(cache if opt.cache else None, out):
            sources_started = time.perf_counter()
            source_json = _prepare_sources(items, rank, world, pool, opt)
            sources_seconds = time.perf_counter() - sources_started
            sources = [Source.from_json(s) for s in source_json]
            if opt.template:
                sources.append(template_source())
            config = check_config_fits_sources(config, sources, where, drop)
            spec_base["config"] = config
            spec, sources, resuming, claim["held"] = _claim_run(out, spec_base, sources, layout, opt.n)
            claim["resuming"] = resuming
        from ..schema.volume_io import remove_temporaries

        mine = [i for i in range(opt.n) if i % world == rank]
        pending = [i for i in mine if not _provenance_path(out, layout.case_id(i)).exists()]
        state = {"sources": [s.to_json() for s in sources], "layout": {"kind": layout.kind,
                 "dataset_id": layout.dataset_id, "name": layout.name}, "model_path": str(model.path),
                 "model_name": model.name, "model_sha256": model.sha256,
                 "device": plan.devices[0], "precision": opt.precision, "seed": int(opt.seed), "config": config,
                 "output": str(out), "anonymous": bool(opt.anonymous),
                 "appearance_spread": float(opt.appearance_spread)}
        if opt.log and resuming:
            opt.log(f"{out}: resuming, {len(mine) - len(pending)} of {len(mine)} cases already complete")
        for index in pending:  # a kill between a record's temporary write and its rename leaves the temporary file
            remove_temporaries(_provenance_path(out, layout.case_id(index)))  # only this rank makes this case
        started = time.perf_counter()
        results = _run_cases(pending, len(mine), state, pool, plan, opt.progress)
        elapsed = time.perf_counter() - started
    except BaseException:
        if pool is not None:
            _stop_workers(pool, others)  # they ignore Ctrl+C (_spawning_without_sigint): stopped here, not waited for
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    done = [layout.case_id(i) for i in range(opt.n) if _provenance_path(out, layout.case_id(i)).exists()]
    finished = len(done) == opt.n
    card_seconds = None
    if finished:
        card_started = time.perf_counter()
        write_dataset_files(out, layout, opt.n, spec, sources, opt.command)
        card_seconds = round(time.perf_counter() - card_started, 3)
        try:
            (out / STAGING_DIR).rmdir()  # empty once every case is in place
        except OSError:
            pass
    return {"cases_done_here": len(results), "cases_complete": len(done), "n": opt.n, "finished": finished,
            "seconds": round(elapsed, 3), "sources_seconds": round(sources_seconds, 3), "card_seconds": card_seconds,
            "workers": n_procs, "threads_per_process": plan.threads, "rank": rank, "world_size": world,
            "cases_per_hour": round(3600.0 * len(results) / elapsed, 1) if results and elapsed > 0 else None,
            "timings_s": [r["timings_s"] for r in results], "output": str(out)}


def write_dataset_files(out: Path, layout: Layout, n: int, spec: dict[str, Any], sources: list[Source],
                        command: str = "") -> None:
    """``dataset.json`` (nnU-Net / MSD) and the dataset card, from the completed cases on disk."""
    from ..schema.volume_io import write_json
    from .card import write_card

    case_ids = [layout.case_id(i) for i in range(n)]
    records = [json.loads(_provenance_path(out, c).read_text()) for c in case_ids]
    anonymous = sum(1 for r in records if r["privacy"]["anonymous"])
    verdict = ("every case anonymous" if anonymous == n else
               f"NOT anonymous: {n - anonymous} of {n} cases carry a real patient's anatomy or tumour")
    description = (f"Synthetic brain-tumour MRI generated by MedSynth (model {spec['model']['name']}); "
                   f"{verdict}, see README.md")
    data = dataset_json(layout, case_ids, description)
    if data is not None:
        write_json(data, out / layout.dataset_dir / "dataset.json", overwrite=True)
    write_card(out, layout, spec, sources, records, command)


def _cuda_devices(device: str) -> list[int]:
    if device not in ("auto",) and not device.startswith("cuda"):
        return []
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        if device.startswith("cuda:"):
            return [int(device.split(":")[1])]
        return list(range(torch.cuda.device_count()))
    except Exception:  # noqa: BLE001 - no usable CUDA means the CPU
        return []


@contextlib.contextmanager
def _spawning_without_sigint() -> Iterator[None]:
    """Worker processes started inside this block (by :func:`_process_pool` or :func:`_device_queue`) ignore SIGINT.

    Ctrl+C in a terminal reaches the whole process group: each worker, interrupted while importing torch or
    deriving a source, printed a traceback before the parent's one line.  Only the parent answers it now, and
    stops the workers itself (:func:`_stop_workers`).

    The parent blocks SIGINT while it starts them: a blocked signal stays blocked across fork and exec, so a worker
    holds a Ctrl+C from its first instruction until its initialiser (:func:`_ignoring_sigint`) ignores it and
    unblocks it.  The parent's own Ctrl+C is held meanwhile (blocked, or recorded when another of its threads takes
    it) and raised when the block ends, once the workers have started: ignoring it here, as before, dropped it.
    The block only starts processes (milliseconds); outside the main thread, where handlers cannot be set, it runs
    as it is.
    """
    import signal
    import threading
    from multiprocessing import resource_tracker

    from ..schema.outputs import signals_deferred

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    # Started by the first spawn otherwise, and it unblocks SIGINT in this thread once it has started.
    resource_tracker.ensure_running()
    with signals_deferred():
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a Ctrl+C held goes to signals_deferred's handler


def _ignoring_sigint(initializer: Any = None, *initargs: Any) -> None:
    """A worker's first step: ignore SIGINT, which it held blocked since it started (the Ctrl+C held is dropped),
    and unblock it, so that what it starts does not inherit the block; then its own initialiser."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    if initializer is not None:
        initializer(*initargs)


def _process_pool(processes: int, context: Any, initializer: Any = None, initargs: tuple[Any, ...] = ()) -> Any:
    """A process pool whose workers, started inside :func:`_spawning_without_sigint`, ignore SIGINT."""
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(processes, mp_context=context, initializer=_ignoring_sigint,
                               initargs=(initializer, *initargs))


def _device_queue(context: Any) -> Any:
    """A queue in a manager process that ignores SIGINT (start it inside :func:`_spawning_without_sigint`)."""
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=context)
    manager.start(_ignoring_sigint)
    return manager.Queue()


def _children() -> frozenset[Any]:
    """This process's live child processes: taken before a pool starts, what :func:`_stop_workers` leaves alone."""
    import multiprocessing

    return frozenset(multiprocessing.active_children())


def _stop_workers(pool: Any, others: frozenset[Any]) -> None:
    """Terminate the child processes started since ``others`` was taken (a pool's workers, which ignore Ctrl+C, and
    the device queue's manager) and drop the work not started.

    An executor keeps its processes to itself; ``multiprocessing.active_children()`` lists every child process this
    process started (and has not reaped), so the pool's are the ones not in ``others``.
    """
    import multiprocessing

    for process in multiprocessing.active_children():
        if process not in others:
            process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


def _prepare_sources(items: list[tuple[str, str, str, str | None]], rank: int, world: int, pool: Any,
                     opt: GenerateOptions) -> list[dict[str, Any]]:
    from tqdm import tqdm

    order = [it for j, it in enumerate(items) if j % world == rank] + [it for j, it in enumerate(items)
                                                                        if j % world != rank]
    results: dict[tuple[str, str, str, str | None], dict[str, Any]] = {}
    bar = tqdm(total=len(order), desc="sources (anatomy cached)", unit="source", file=sys.stderr,
               disable=not opt.progress or None, leave=False)
    try:
        if pool is None:
            for item in order:
                results[item] = _prepare_one(item)
                bar.update(1)
        else:
            with _spawning_without_sigint():
                mapped = pool.map(_prepare_one, order)  # submits every item: the workers start here
            for item, result in zip(order, mapped):
                results[item] = result
                bar.update(1)
    finally:
        bar.close()
    return [results[it] for it in items]


def _run_cases(pending: list[int], total: int, state: dict[str, Any], pool: Any, plan: ProcessPlan,
               progress: bool) -> list[dict[str, Any]]:
    from tqdm import tqdm

    bar = tqdm(total=total, initial=total - len(pending), desc="generate", unit="case", file=sys.stderr,
               disable=not progress or None, dynamic_ncols=True)
    results: list[dict[str, Any]] = []
    try:
        if not pending:
            return results
        if pool is None:
            import torch

            # Only ever fewer threads than the caller's (torchrun ranks sharing a node's cores).
            fewer = plan.threads if plan.threads is not None and plan.threads < torch.get_num_threads() else None
            _init_worker(state, threads=fewer)
            for index in pending:
                results.append(_run_case(index))
                bar.update(1)
            return results
        # A fresh pool whose initialiser loads the model (the source pool's processes never did).
        import multiprocessing
        from concurrent.futures import as_completed

        pool.shutdown()
        others = _children()  # the source pool's workers have ended: what starts now is this pool's (and its queue's)
        context = multiprocessing.get_context("spawn")
        queue = None
        if len(set(plan.devices)) > 1:  # one GPU each: every worker takes the next from the queue
            with _spawning_without_sigint():
                queue = _device_queue(context)
            for device in plan.devices:
                queue.put(device)
        workers = _process_pool(plan.processes, context, _init_worker, (state, queue, plan.threads))
        try:
            with _spawning_without_sigint():
                futures = [workers.submit(_run_case, i) for i in pending]  # the workers start here
            for future in as_completed(futures):
                results.append(future.result())
                bar.update(1)
        except BaseException:
            _stop_workers(workers, others)
            raise
        workers.shutdown()
        return results
    finally:
        bar.close()
