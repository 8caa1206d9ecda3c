"""``medsynth study`` resumed in a work folder an older MedSynth wrote: synthetic cases without the draw records.

Before ``random_tumour`` draw records (0587e7b) a synthetic case's edit history held only the edits a draw made;
that change to ``MedSynthLib.edits.random_edits`` also changed the synthetic stage's cache key (it hashes the
module's source), so a resumed study makes its synthetic cases again.  The arms that train on them took the new
key too and were trained again, silently, though the cases were the same to the byte.  The arms are reused now
where the cases made again are identical to the older ones, trained again where they differ, with one line each.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from MedSynthLib.cli import main
from test_study import older_code, study_args, write_cases

SYNTHETIC_ARMS = re.compile(r" arm (real\+synthetic|synthetic|synthetic\+finetune|real\+classmean) seed ")


@pytest.fixture(scope="module")
def older_work(tmp_path_factory) -> dict:
    """A finished micro study whose synthetic stage an older version of the draw code made, its cases' histories
    without the ``random_tumour`` records (as that version wrote them)."""
    root = tmp_path_factory.mktemp("older_study")
    data = write_cases(root / "cases")
    work = root / "work"
    with older_code():  # the key an older version of the draw code gave the synthetic stage
        assert main(study_args(data, root / "before", "--work", str(work))) == 0
    stripped = 0
    for index_path in (work / "synthetic").glob("*/index.json"):
        index = json.loads(index_path.read_text())
        for case in index["cases"]:
            kept = [r for r in case["edits"] if r["name"] != "random_tumour"]
            stripped += len(case["edits"]) - len(kept)
            case["edits"] = kept
        index_path.write_text(json.dumps(index))
    assert stripped, "the study drew no random tumour edit"
    return {"data": data, "work": work, "report": json.loads((root / "before" / "report.json").read_text())}


def _resume(older_work: dict, tmp_path: Path, capsys) -> tuple[dict, str, Path]:
    capsys.readouterr()
    out = tmp_path / "after"
    assert main(study_args(older_work["data"], out, "--work", str(tmp_path / "work"))) == 0
    return json.loads((out / "report.json").read_text()), capsys.readouterr().err, out


def _synthetic_arms(report: dict) -> dict[str, bool]:
    arms = {k: v for k, v in report["timings"]["stage_computed_this_run"].items() if SYNTHETIC_ARMS.search(k)}
    assert len(arms) == 2 * 4 * 2, arms  # 2 folds x 4 arms that train on synthetic cases x 2 seeds
    return arms


def _check_provenance(report: dict) -> None:
    """Every synthetic case of the report holds its draw record before the edits the draw made (no older one)."""
    for fold in report["synthetic_cases"]:
        assert fold["provenance"]
        for case in fold["provenance"]:
            names = [r["name"] for r in case["edits"]]
            assert "random_tumour" in names, names


def test_identical_synthetic_cases_of_an_older_version_keep_their_arms(older_work, tmp_path, capsys):
    shutil.copytree(older_work["work"], tmp_path / "work")
    report, err, _ = _resume(older_work, tmp_path, capsys)
    assert not any(_synthetic_arms(report).values()), "arms trained again on the same synthetic cases"
    notices = [line for line in err.splitlines() if "made by another version" in line]
    assert len(notices) == 2 and all("identical" in line and "reused" in line for line in notices), err
    assert report["segmentation"] == older_work["report"]["segmentation"]
    _check_provenance(report)
    # The reused results now stand under the new keys: a rerun finds every stage cached, without a notice.
    capsys.readouterr()
    assert main(study_args(older_work["data"], tmp_path / "again", "--work", str(tmp_path / "work"))) == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert not any(again["timings"]["stage_computed_this_run"].values())
    assert "made by another version" not in capsys.readouterr().err


def test_differing_synthetic_cases_of_an_older_version_train_their_arms_again(older_work, tmp_path, capsys):
    shutil.copytree(older_work["work"], tmp_path / "work")
    for images in (tmp_path / "work" / "synthetic").glob("*/synthetic_0000_images.npy"):
        array = np.load(images)
        np.save(images, array + np.float16(0.5))  # another synthesis code would have painted otherwise
    report, err, _ = _resume(older_work, tmp_path, capsys)
    assert all(_synthetic_arms(report).values()), "arms reused although their synthetic cases differ"
    notices = [line for line in err.splitlines() if "made by another version" in line]
    assert len(notices) == 2 and all("differ" in line and "trained again" in line for line in notices), err
    _check_provenance(report)
