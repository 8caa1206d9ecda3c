"""``medsynth review``: the review record, the blinded reader study, and the web pages in a real browser.

The browser tests start ``medsynth review`` in a subprocess on a free loopback port and drive
Debian's Chromium with Playwright (``.ci/run`` installs it).  Locally they skip, with the reason,
when Chromium, Playwright or the web extra is missing; under ``CI=true`` they fail instead.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

from conftest import phantom, write_phantom_case, write_volume
from MedSynthLib import cli
from MedSynthLib.evaluation.reader_study import (
    ReaderStudy,
    plan_study,
    proportion,
    summarise,
    summary_text,
    write_summary,
)
from MedSynthLib.schema.errors import MedSynthError
from MedSynthLib.schema.review import save_review

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SERVER_START_S = 120  # the Slicer libraries load in ~7 s alone; generous for 2 busy cores
PAGE_WAIT_MS = 60_000


# --- cases ----------------------------------------------------------------------------------------


def make_real_case(root: Path, index: int) -> Path:
    """A phantom in BraTS 2021 naming (four contrasts and the expert segmentation)."""
    return write_phantom_case(root, index)


def make_synthetic_case(root: Path, index: int, shape=None, spacing=(1.0, 1.0, 1.0)) -> Path:
    """A folder shaped like ``medsynth synthesize`` output: four contrasts, labels, provenance.

    Every phantom has one brain and one spherical tumour; the synthetic cases' are mirrored front to back and
    moved 2 voxels (more for a higher ``index``), the tumour an ellipsoid of its own shape, as another patient's
    (brain-mask Dice at most 0.91, tumour Dice at most 0.74 even with the centres aligned): a synthetic case
    with a real case's anatomy or tumour, or two of one patient, are refused by a reader study.
    """
    images, seg = phantom(seed=index) if shape is None else phantom(shape=shape, seed=index)
    radii = ((9.0, 4.5, 6.0), (4.5, 6.0, 10.0), (6.0, 10.0, 4.0))[index % 3]
    centre = np.argwhere(seg > 0).mean(axis=0)
    r = np.sqrt(sum(((axis - c) / radius) ** 2 for axis, c, radius in zip(np.indices(seg.shape), centre, radii)))
    seg = np.select([r < 0.36, r < 0.64, r < 1.0], [1, 4, 2], 0).astype(seg.dtype) * (images["t1"] > 0)
    move = 2 + 2 * (index % 3)
    images = {m: np.roll(array[:, ::-1], move, axis=2) for m, array in images.items()}
    seg = np.roll(seg[:, ::-1], move, axis=2)
    rng = np.random.default_rng(100 + index)
    t1 = images["t1"]
    labels = np.select([t1 > 800, t1 > 500, t1 > 0], [3, 2, 1], 0).astype(np.uint8)
    labels[seg == 2], labels[seg == 4], labels[seg == 1] = 5, 6, 4
    folder = root / f"synthetic_{index}"
    for modality, array in images.items():
        noisy = array * 0.9 + rng.normal(0, 20, array.shape) * (array > 0)
        write_volume(noisy.astype(np.int16), folder / f"{modality}.nii.gz", spacing=spacing)
    write_volume(labels, folder / "labels.nii.gz", spacing=spacing)
    (folder / "provenance.json").write_text(json.dumps(
        {"kind": "medsynth-synthetic-case", "synthetic": True, "seed": index, "model": {"name": "test"}}))
    return folder


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("cases")
    return {"real": [make_real_case(root, i) for i in range(2)],
            "synthetic": [make_synthetic_case(root, i) for i in range(2)]}


# --- the review record ----------------------------------------------------------------------------


def test_save_review_writes_provenance_and_keeps_the_rest(tmp_path):
    case = make_synthetic_case(tmp_path, 0)
    review = save_review(case, 4, "  ring enhancement\x07 looks real \n")
    provenance = json.loads((case / "provenance.json").read_text())
    assert provenance["review"] == review
    assert review["rating"] == 4 and review["note"] == "ring enhancement looks real"
    assert provenance["model"] == {"name": "test"} and provenance["seed"] == 0  # the rest kept
    assert save_review(case, 0)["rating"] == 0  # 0 = not rated, as in the Slicer panel


@pytest.mark.parametrize("rating", [6, -1, 2.5, True, "3"])
def test_save_review_refuses_bad_ratings(tmp_path, rating):
    case = make_synthetic_case(tmp_path, 0)
    before = (case / "provenance.json").read_bytes()
    with pytest.raises(MedSynthError, match="rating"):
        save_review(case, rating)
    assert (case / "provenance.json").read_bytes() == before


def test_save_review_refuses_a_real_case_and_a_long_note(tmp_path):
    with pytest.raises(MedSynthError, match="provenance"):
        save_review(make_real_case(tmp_path, 0), 3)
    with pytest.raises(MedSynthError, match="note"):
        save_review(make_synthetic_case(tmp_path, 1), 3, "x" * 501)


# --- the reader study -----------------------------------------------------------------------------


def test_plan_is_seeded_balanced_and_blinded(cases):
    plan = plan_study(cases["real"], cases["synthetic"], seed=7, n_per_class=4)
    again = plan_study(cases["real"], cases["synthetic"], seed=7, n_per_class=4)
    other = plan_study(cases["real"], cases["synthetic"], seed=8, n_per_class=4)
    order = [(i["case"], i["modality"]) for i in plan["items"]]
    assert order == [(i["case"], i["modality"]) for i in again["items"]]
    assert order != [(i["case"], i["modality"]) for i in other["items"]]
    truths = [i["truth"] for i in plan["items"]]
    assert truths.count("real") == truths.count("synthetic") == 4
    for truth in ("real", "synthetic"):  # round-robin over the contrasts within each class
        assert sorted(i["modality"] for i in plan["items"] if i["truth"] == truth) == ["flair", "t1", "t1ce", "t2"]
    assert [i["item_id"] for i in plan["items"]] == [f"item-{n:03d}" for n in range(1, 9)]
    # The slice goes through the tumour: the phantom's tumour centre is 8 voxels anterior-ish of the middle.
    assert plan["items"][0]["centre_ras"][2] == pytest.approx(20.0, abs=1.0)


def test_plan_refuses_wrong_inputs(cases):
    with pytest.raises(MedSynthError, match="given as real"):
        plan_study(cases["synthetic"], cases["synthetic"])
    with pytest.raises(MedSynthError, match="n-per-class"):
        plan_study(cases["real"], cases["synthetic"], n_per_class=9)
    with pytest.raises(MedSynthError, match="at least one"):
        plan_study([], cases["synthetic"])


def test_plan_draws_from_every_case_not_one_per_class(cases):
    # With 2 cases per class and 2 items per class, each item must come from another case: taking
    # every contrast of the first case in the seeded order would put one real and one synthetic
    # case in front of the reader (item-level accuracy then measures two cases, not a model).
    for n_per_class in (2, 4):
        for seed in range(4):
            plan = plan_study(cases["real"], cases["synthetic"], seed=seed, n_per_class=n_per_class)
            for truth in ("real", "synthetic"):
                used = [i["case"] for i in plan["items"] if i["truth"] == truth]
                assert len(set(used)) == 2, (n_per_class, seed, truth, used)
                assert sorted(used.count(c) for c in set(used)) == [n_per_class // 2] * 2
                assert sorted(i["modality"] for i in plan["items"] if i["truth"] == truth) == \
                    sorted(["t1", "t1ce", "t2", "flair"][:n_per_class])


def test_plan_refuses_cases_on_other_grids(cases, tmp_path):
    # Real and synthetic images on different grids are told apart by the view's field of view and
    # slice range, not by the image: the study must refuse them.
    other_size = make_synthetic_case(tmp_path / "size", 0, shape=(44, 48, 40))
    with pytest.raises(MedSynthError, match="grid"):
        plan_study(cases["real"], [other_size, cases["synthetic"][1]])
    other_spacing = make_synthetic_case(tmp_path / "spacing", 0, spacing=(1.0, 1.0, 1.5))
    with pytest.raises(MedSynthError, match="grid"):
        plan_study(cases["real"], [cases["synthetic"][0], other_spacing])
    with pytest.raises(MedSynthError, match="grid"):
        ReaderStudy.create_or_resume(tmp_path / "results", cases["real"], [other_size])
    assert not (tmp_path / "results").exists()


def _study_app(cases, tmp_path):
    """A reader study of two items per class and its page app (no browser); skipped without trame_slicer."""
    missing = None if find_spec("trame_slicer") else "trame_slicer not installed (pip install -e '.[web]')"
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(missing)
        pytest.skip(missing)
    from MedSynthWeb.study_app import StudyApp

    study = ReaderStudy.create_or_resume(tmp_path / "results", cases["real"], cases["synthetic"], seed=0,
                                         n_per_class=2)
    return study, StudyApp(study)


def test_study_page_state_carries_no_slice_geometry(cases, tmp_path):
    # The page's state is what any reader can read (browser dev tools, the websocket): it must hold
    # the item id and the form, not the slice position, the grid's slice range or its spacing.
    study, app = _study_app(cases, tmp_path)
    expected = sorted(["item_id", "position", "total", "answer", "confidence", "done", "status",
                       "Study_active_view_cursor"])
    for _ in range(2):  # the first item, and the next one after an answer
        item = app._current
        state = {k: v for k, v in app.state.initial.items() if not k.startswith("trame__")}  # what a client gets
        assert sorted(state) == expected, sorted(state)
        assert item.centre_ras[2] not in state.values()
        app.submit(item.item_id, "real", 1)
        assert study.answered() >= {item.item_id}


def test_study_clears_the_answer_on_the_page_when_its_update_is_still_in_flight(cases, tmp_path):
    # The Next click carries the answer; the page's own state update for that answer can reach the
    # server after the click. The server then still holds no answer, and clearing it for the next
    # item must reach the page anyway: left selected, a reader's click on the same answer for the
    # next item would toggle it off (seen in CI as a Next button that never enabled).
    study, app = _study_app(cases, tmp_path)
    app.state.ready()  # as once a page is connected: every change is pushed from here on
    pushed: list[tuple] = []
    app.state.change("answer", "confidence")(
        lambda **state: pushed.append((sorted(app.state.modified_keys & {"answer", "confidence"}),
                                       state["answer"], state["confidence"])))
    first = app._current
    app.submit(first.item_id, "synthetic", 2)
    assert app._current.item_id != first.item_id
    assert pushed == [(["answer", "confidence"], None, None)], pushed


def test_study_saves_each_answer_and_resumes(cases, tmp_path):
    results = tmp_path / "results"
    study = ReaderStudy.create_or_resume(results, cases["real"], cases["synthetic"], seed=1, n_per_class=2)
    first = study.next_item()
    row = study.answer(first.item_id, "synthetic", 2)
    assert row["correct"] == (first.truth == "synthetic")
    with pytest.raises(MedSynthError, match="already"):
        study.answer(first.item_id, "real", 1)
    with pytest.raises(MedSynthError, match="confidence"):
        study.answer(study.next_item().item_id, "real", 5)
    with pytest.raises(MedSynthError, match="answer"):
        study.answer(study.next_item().item_id, "maybe", 1)
    rows = list(csv.DictReader(io.StringIO((results / "responses.csv").read_text())))
    assert [r["item_id"] for r in rows] == [first.item_id]
    assert json.loads((results / "responses.json").read_text())["responses"][0]["answer"] == "synthetic"
    study.close()  # one server per results folder: the first holds the study until it stops
    resumed = ReaderStudy.create_or_resume(results, cases["real"], cases["synthetic"], seed=1, n_per_class=2)
    assert resumed.answered() == {first.item_id} and resumed.next_item().item_id == "item-002"
    resumed.close()
    with pytest.raises(MedSynthError, match="--seed"):
        ReaderStudy.create_or_resume(results, cases["real"], cases["synthetic"], seed=2)
    assert not list(results.glob(".*tmp*"))  # atomic writes leave no temporary files


def test_summary_intervals_and_rates():
    from scipy.stats import binomtest

    exact = binomtest(8, 10).proportion_ci(0.95, method="exact")
    assert proportion(8, 10)["ci95"] == [round(exact.low, 4), round(exact.high, 4)]
    assert proportion(8, 10)["ci95"] == pytest.approx([0.4439, 0.9748], abs=1e-4)
    assert proportion(0, 0)["rate"] is None
    responses = [  # 3 synthetic (2 caught), 3 real (1 called real)
        {"item_id": "a", "modality": "t1", "answer": "synthetic", "confidence": 3, "truth": "synthetic", "correct": True},
        {"item_id": "b", "modality": "t2", "answer": "synthetic", "confidence": 2, "truth": "synthetic", "correct": True},
        {"item_id": "c", "modality": "t2", "answer": "real", "confidence": 1, "truth": "synthetic", "correct": False},
        {"item_id": "d", "modality": "t1", "answer": "real", "confidence": 1, "truth": "real", "correct": True},
        {"item_id": "e", "modality": "flair", "answer": "synthetic", "confidence": 2, "truth": "real", "correct": False},
        {"item_id": "f", "modality": "flair", "answer": "synthetic", "confidence": 1, "truth": "real", "correct": False},
    ]
    summary = summarise(responses, 6)
    assert summary["accuracy"]["k"] == 3 and summary["accuracy"]["n"] == 6
    assert summary["per_modality"]["t1"]["rate"] == 1.0 and summary["per_modality"]["flair"]["rate"] == 0.0
    assert "t1ce" not in summary["per_modality"]
    assert summary["sensitivity_synthetic"]["rate"] == pytest.approx(2 / 3, abs=1e-4)
    assert summary["specificity_synthetic"]["rate"] == pytest.approx(1 / 3, abs=1e-4)
    text = summary_text(summary)
    assert "50.0 % (3/6" in text and "chance" in summary["note"]


def _answers(correct: int, total: int) -> list[dict]:
    """``total`` answers (half synthetic, half real items), the first ``correct`` of them right."""
    rows = []
    for i in range(total):
        truth = "synthetic" if i % 2 else "real"
        other = "real" if truth == "synthetic" else "synthetic"
        answer = truth if i < correct else other
        rows.append({"item_id": f"i{i}", "modality": "t1", "answer": answer, "confidence": 2, "truth": truth,
                     "correct": answer == truth})
    return rows


@pytest.mark.parametrize("correct, total, p_value, words", [
    (7, 8, 0.0703, "not shown to differ from chance"),  # CI 47-100 %: contains 0.5, yet no evidence of 'could not tell'
    (8, 8, 0.0078, "better than chance"),
    (0, 8, 0.0078, "reversed"),
    (20, 40, 1.0, "not shown to differ from chance"),
])
def test_summary_tests_against_chance_and_never_claims_indistinguishable(correct, total, p_value, words):
    """Not rejecting 50 % is not evidence that the images are indistinguishable (7 of 8 right has a 95 % interval of
    47-100 %); accuracy far below 50 % means the classes are told apart, the wrong way round."""
    summary = summarise(_answers(correct, total), total)
    assert summary["p_vs_chance"] == pytest.approx(p_value, abs=1e-4)
    assert words in summary["note"]
    assert "could not tell" not in summary["note"]
    assert "not independent" in summary["note"]  # four contrasts of one case, one slice: the interval is too narrow
    assert f"p = {p_value:.3g}" in summary_text(summary) or f"p = {p_value:.2g}" in summary_text(summary)


def test_cli_summarise_and_missing_web_extra(cases, tmp_path, capsys, monkeypatch):
    results = tmp_path / "results"
    study = ReaderStudy.create_or_resume(results, cases["real"], cases["synthetic"], seed=0, n_per_class=1)
    for item in study.items:
        study.answer(item.item_id, item.truth, 3)
    assert cli.main(["review", "--summarise", str(results)]) == 0
    out = capsys.readouterr().out
    assert "accuracy | 100.0 % (2/2" in out
    assert json.loads((results / "summary.json").read_text())["accuracy"]["rate"] == 1.0
    assert cli.main(["review", "--summarise", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no reader study" in err

    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "trame_slicer" else real_find_spec(name, *a))
    assert cli.main(["review", str(cases["synthetic"][0])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "medsynth[web]" in err and "Traceback" not in err


# --- the pages in a real browser ------------------------------------------------------------------


def _browser_missing() -> str | None:
    if not CHROMIUM.is_file():
        return f"{CHROMIUM} not installed (apt-get install chromium; .ci/run does)"
    for module, extra in (("playwright", "test"), ("trame_slicer", "web")):
        if find_spec(module) is None:
            return f"{module} not installed (pip install -e '.[{extra}]')"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the browser test must run in CI: {missing}")
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000)
        yield chromium
        chromium.close()


def test_review_views_share_one_slice_offset(cases):
    # Moving one view moves all eight (Slicer's slice-link logic is not in the bare Slicer libraries).
    missing = None if find_spec("trame_slicer") else "trame_slicer not installed (pip install -e '.[web]')"
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(missing)
        pytest.skip(missing)
    from MedSynthWeb.cli import review_entries
    from MedSynthWeb.review_app import ReviewApp

    synthetic, real = cases["synthetic"][0], cases["real"][0]
    app = ReviewApp(review_entries([synthetic], [(synthetic, real)]))
    views = [app.slicer.view_manager.get_view(tag) for tag in ("real_t1", "real_flair", "synthetic_t2")]
    start = views[0].get_slice_value()
    assert start == pytest.approx(20.0, abs=1.0)  # through the phantom's tumour
    views[0].set_slice_value(start + 5)
    assert [v.get_slice_value() for v in views] == pytest.approx([start + 5] * 3)
    assert app.state.can_rate and app.state.paired


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``medsynth review ARGS`` on a free loopback port, stopped on exit."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.port = _free_port()
        self.log = log
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "MedSynthLib", "review", *args, "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=REPO)
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"medsynth review exited ({self.process.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise AssertionError(f"medsynth review did not listen within {SERVER_START_S} s:\n{log.read_text()[-3000:]}")

    @property
    def url(self) -> str:
        """The address the server printed for the reader: with the access token of this start."""
        printed = re.search(r"at (http://\S+/\?token=\S+) ", self.log.read_text())
        assert printed, f"medsynth review printed no address with an access token:\n{self.log.read_text()[-3000:]}"
        return printed[1]

    @property
    def token(self) -> str:
        return self.url.rsplit("token=", 1)[1]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _pixels(locator) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB"), dtype=np.int16)


def _wait_for_images(page, count: int) -> None:
    """Wait until ``count`` view images have arrived from the server (decoded, non-zero size)."""
    page.wait_for_function(
        f"() => Array.from(document.querySelectorAll('img')).filter(i => i.complete && i.naturalWidth > 0)"
        f".length >= {count}", timeout=PAGE_WAIT_MS)


def _assert_not_blank(image: np.ndarray, what: str) -> None:
    grey = image.mean(axis=2)
    assert grey.std() > 20, f"{what}: the view is blank (std {grey.std():.1f})"
    assert 0.05 < (grey > 40).mean() < 0.95, f"{what}: no brain in the view"


def _render_settled(page, locator, what: str) -> np.ndarray:
    """The view's pixels once a render has arrived (the first frame can precede the volume)."""
    deadline = time.monotonic() + PAGE_WAIT_MS / 1000
    while True:
        image = _pixels(locator)
        grey = image.mean(axis=2)
        if grey.std() > 20 or time.monotonic() > deadline:
            _assert_not_blank(image, what)
            return image
        page.wait_for_timeout(500)


def test_review_page_renders_and_saves_a_rating(browser, cases, tmp_path):
    synthetic = tmp_path / "synthetic_0"
    shutil.copytree(cases["synthetic"][0], synthetic)
    real = cases["real"][0]
    with Server([str(synthetic), "--pair", str(synthetic), str(real)], tmp_path / "review.log") as server:
        page = browser.new_page(viewport={"width": 1600, "height": 900})
        try:
            page.goto(server.url, timeout=PAGE_WAIT_MS)
            _wait_for_images(page, 8)  # four contrasts, real above synthetic
            images = page.locator("img")
            assert images.count() == 8
            synthetic_views = [_render_settled(page, images.nth(n), f"view {n}") for n in range(8)]
            # Tumour outlines: the ED outline (outermost) is drawn green on the grey images.
            view = synthetic_views[7]
            green = (view[..., 1] > 150) & (view[..., 0] < 90) & (view[..., 2] < 90)
            assert green.sum() > 20, "no tumour outline in the synthetic FLAIR view"
            assert "Top: real case" in page.inner_text("#review-form")

            page.click("#rating-4")
            page.fill("#note", "oedema margin looks plausible")
            page.click("#save-review")
            page.wait_for_function("() => (document.querySelector('#status')?.innerText || '').startsWith('saved')",
                                   timeout=PAGE_WAIT_MS)
        finally:
            page.close()
    review = json.loads((synthetic / "provenance.json").read_text())["review"]
    assert review["rating"] == 4 and review["note"] == "oedema margin looks plausible"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", review["reviewed_at"])


def test_blinded_study_in_the_browser(browser, cases, tmp_path):
    results = tmp_path / "results"
    args = ["--study", *map(str, cases["real"]), "--synthetic", *map(str, cases["synthetic"]),
            "-o", str(results), "--seed", "5", "--n-per-class", "2"]
    with Server(args, tmp_path / "study.log") as server:
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        try:
            page.goto(server.url, timeout=PAGE_WAIT_MS)
            for position in range(1, 5):
                item_id = f"item-{position:03d}"
                page.wait_for_function(
                    f"() => (document.querySelector('#progress')?.innerText || '').startsWith('{item_id}')",
                    timeout=PAGE_WAIT_MS)
                _wait_for_images(page, 1)
                _render_settled(page, page.locator("img").first, item_id)
                html = page.content()
                for case in [*cases["real"], *cases["synthetic"]]:
                    assert case.name not in html, f"the page shows the case name {case.name}"
                page.click("#answer-synthetic")
                page.click("#confidence-2")
                page.wait_for_selector("#submit:not([disabled])", timeout=PAGE_WAIT_MS)
                page.click("#submit")
            page.wait_for_selector("#study-done", state="visible", timeout=PAGE_WAIT_MS)
        except Exception as error:
            raise AssertionError(f"{error}\npage status: {page.inner_text('#study-form')!r}\n"
                                 f"server log:\n{(tmp_path / 'study.log').read_text()[-2000:]}") from error
        finally:
            page.close()
    plan = json.loads((results / "study_plan.json").read_text())
    truths = {item["item_id"]: item["truth"] for item in plan["items"]}
    rows = list(csv.DictReader(io.StringIO((results / "responses.csv").read_text())))
    assert [r["item_id"] for r in rows] == ["item-001", "item-002", "item-003", "item-004"]
    assert all(r["answer"] == "synthetic" and r["confidence"] == "2" for r in rows)
    assert [r["correct"] == "True" for r in rows] == [truths[r["item_id"]] == "synthetic" for r in rows]
    assert len(json.loads((results / "responses.json").read_text())["responses"]) == 4
    # Always answering "synthetic": sensitivity 1, specificity 0, accuracy 1/2 (balanced classes).
    summary = json.loads((results / "summary.json").read_text())
    assert summary["accuracy"]["k"] == 2 and summary["accuracy"]["n"] == 4
    assert summary["sensitivity_synthetic"]["rate"] == 1.0 and summary["specificity_synthetic"]["rate"] == 0.0
    assert summary == write_summary(results)


def test_ci_installs_chromium_before_the_readme_test_command():
    script = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()
    # The README's command 2 (the line that installs the test extra), whatever options its pytest has.
    command = next(line for line in readme.splitlines()
                   if line.startswith('python3 -m venv .venv && .venv/bin/pip install -e ".[test]" && '))
    assert "-m pytest" in command and script.rstrip().endswith(command)
    assert script.index("apt-get install -y -qq chromium") < script.index(command)
    assert script.index("apt-get update") < script.index("apt-get install")


def test_cli_review_bad_input_is_one_line(cases, tmp_path, capsys):
    if find_spec("trame_slicer") is None:
        pytest.skip("trame_slicer not installed: the missing extra is what the command reports")
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file\n")
    for args, expected in (
        (["review", str(tmp_path / "missing_case")], "case folder not found"),
        (["review", "--study", str(cases["real"][0])], "--synthetic"),
        (["review", "--pair", str(cases["real"][0]), str(cases["synthetic"][0])], "synthetic case first"),
        (["review"], "CASE_DIRS"),
        (["review", str(cases["real"][0]), "--port", "99999"], "--port"),
        (["review", "--study", str(cases["real"][0]), "--synthetic", str(cases["synthetic"][0]),
          "-o", str(blocker)], "not a folder"),
        (["review", "--study", str(cases["real"][0]), "--synthetic", str(cases["synthetic"][0]),
          "-o", str(blocker / "results")], "not a folder"),
    ):
        assert cli.main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and expected in err and "Traceback" not in err, err
    assert not (tmp_path / "missing_case").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"] and blocker.read_text() == "a file\n"


def test_cli_review_on_a_port_in_use_is_one_line(cases, capfd):
    if find_spec("trame_slicer") is None:
        pytest.skip("trame_slicer not installed: the missing extra is what the command reports")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        capfd.readouterr()
        assert cli.main(["review", str(cases["real"][0]), "--port", str(port)]) == 2
        err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("medsynth")]
    assert len(err) == 1 and f"--port {port}" in err[0] and "cannot listen" in err[0], err


# --- audit: one server per results folder, inputs checked at resume, strict page messages ---------


def _study_args(cases, results: Path, *extra: str) -> list[str]:
    return ["review", "--study", *map(str, cases["real"]), "--synthetic", *map(str, cases["synthetic"]),
            "-o", str(results), "--port", str(_free_port()), *extra]


def _one_line(capsys, expected: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and "Traceback" not in err, err
    return err


def test_a_second_server_on_one_results_folder_is_refused(cases, tmp_path, capsys):
    # Two servers on one -o each rewrote responses.json from their own memory: answers vanished.
    results = tmp_path / "results"
    first = ReaderStudy.create_or_resume(results, cases["real"], cases["synthetic"], seed=0, n_per_class=2)
    with pytest.raises(MedSynthError, match="another medsynth review"):
        ReaderStudy.create_or_resume(results, cases["real"], cases["synthetic"], seed=0, n_per_class=2)
    with pytest.raises(MedSynthError, match="another medsynth review"):
        ReaderStudy.create_or_resume(tmp_path / "." / "results", cases["real"], cases["synthetic"], seed=0,
                                     n_per_class=2)
    if find_spec("trame_slicer") is not None:
        assert cli.main(_study_args(cases, results, "--n-per-class", "2")) == 2
        _one_line(capsys, "another medsynth review")
    first.answer(first.next_item().item_id, "real", 1)
    first.close()
    resumed = ReaderStudy.create_or_resume(results, cases["real"], cases["synthetic"], seed=0, n_per_class=2)
    assert len(resumed.answered()) == 1
    resumed.close()
    # A lock left by a process that died (kill -9) does not block: the kernel released its lock.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)"),
        str(tmp_path / ".results.medsynth-lock")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(MedSynthError, match="another medsynth review"):
        ReaderStudy.create_or_resume(results, cases["real"], cases["synthetic"], seed=0, n_per_class=2)
    holder.kill()
    holder.wait()
    again = ReaderStudy.create_or_resume(results, cases["real"], cases["synthetic"], seed=0, n_per_class=2)
    assert len(again.answered()) == 1
    again.close()


def _inpainted(tmp_path: Path) -> Path:
    case = make_synthetic_case(tmp_path, 5)
    provenance = json.loads((case / "provenance.json").read_text())
    provenance.update(privacy={"anatomy": "patient", "images": "patient"}, inpainting={"region_margin_mm": 5.0})
    (case / "provenance.json").write_text(json.dumps(provenance))
    return case


def test_plan_refuses_a_patients_inpainted_scan_as_synthetic(cases, tmp_path, capsys):
    # synthesize --context writes the patient's own scan with one region re-rendered: mostly real pixels.
    inpainted = _inpainted(tmp_path)
    with pytest.raises(MedSynthError, match="patient's scan"):
        plan_study(cases["real"], [cases["synthetic"][0], inpainted])
    if find_spec("trame_slicer") is not None:
        results = tmp_path / "results"
        args = ["review", "--study", *map(str, cases["real"]), "--synthetic", str(inpainted),
                "-o", str(results), "--port", str(_free_port())]
        assert cli.main(args) == 2
        assert str(inpainted) in _one_line(capsys, "patient's scan")
        assert not results.exists()


def test_resume_checks_every_planned_file_and_its_content(cases, tmp_path):
    root = tmp_path / "cases"
    real = [shutil.copytree(c, root / c.name) for c in cases["real"]]
    synthetic = [shutil.copytree(c, root / c.name) for c in cases["synthetic"]]
    results = tmp_path / "results"
    study = ReaderStudy.create_or_resume(results, real, synthetic, seed=0, n_per_class=2)
    plan = json.loads((results / "study_plan.json").read_text())
    assert set(plan["files_sha256"]) == {item["image"] for item in plan["items"]}
    study.close()
    image = Path(plan["items"][0]["image"])
    saved = image.read_bytes()
    image.unlink()
    with pytest.raises(MedSynthError, match="missing") as error:
        ReaderStudy.create_or_resume(results, real, synthetic, seed=0, n_per_class=2)
    assert str(image) in str(error.value)
    image.write_bytes(saved[:-8] + b"\0" * 8)  # regenerated with --overwrite: same path, other content
    with pytest.raises(MedSynthError, match="changed since the study was planned"):
        ReaderStudy.create_or_resume(results, real, synthetic, seed=0, n_per_class=2)
    image.write_bytes(saved)
    ReaderStudy.create_or_resume(results, real, synthetic, seed=0, n_per_class=2).close()


def test_cli_review_seed_out_of_range_is_one_line(cases, tmp_path, capsys):
    for seed in ("-1", str(2**32)):
        assert cli.main(_study_args(cases, tmp_path / "results", "--seed", seed)) == 2
        _one_line(capsys, "--seed")
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("responses", [
    {"responses": [{"item_id": "item-001"}]}, {"responses": "abc"}, {"responses": [1]}, [1, 2],
    {"responses": [{"item_id": "item-099", "modality": "t1", "answer": "real", "confidence": 1, "truth": "real",
                    "correct": True, "answered_at": "x"}]},
    {"responses": [{"item_id": "item-001", "modality": "t1", "answer": "real", "confidence": "2", "truth": "real",
                    "correct": True, "answered_at": "x"}]},
])
def test_cli_summarise_malformed_responses_is_one_line(cases, tmp_path, capsys, responses):
    results = tmp_path / "results"
    ReaderStudy.create_or_resume(results, cases["real"], cases["synthetic"], seed=0, n_per_class=1).close()
    (results / "responses.json").write_text(json.dumps(responses))
    assert cli.main(["review", "--summarise", str(results)]) == 2
    assert str(results / "responses.json") in _one_line(capsys, "responses.json")
    assert not (results / "summary.json").exists()


def test_results_folder_inside_a_case_folder_is_refused(cases, tmp_path):
    for inside in (cases["real"][0] / "study", cases["synthetic"][1] / "a" / "study"):
        with pytest.raises(MedSynthError, match="inside the case folder"):
            ReaderStudy.create_or_resume(inside, cases["real"], cases["synthetic"], seed=0, n_per_class=1)
        assert not inside.exists() and not inside.parent.joinpath(f".{inside.name}.medsynth-lock").exists()


def test_resume_refuses_changed_inputs(cases, tmp_path):
    results = tmp_path / "results"
    extra = make_synthetic_case(tmp_path, 7)
    ReaderStudy.create_or_resume(results, cases["real"], cases["synthetic"], seed=0, n_per_class=2).close()
    for real, synthetic, n, what in (
        (cases["real"], cases["synthetic"], 3, "--n-per-class"),
        (cases["real"], cases["synthetic"], None, "--n-per-class"),
        (cases["real"], [*cases["synthetic"], extra], 2, "synthetic cases"),
        (cases["real"][:1], cases["synthetic"], 2, "real cases"),
        ([cases["real"][0], cases["synthetic"][0]], [cases["real"][1], cases["synthetic"][1]], 2, "real cases"),
    ):
        with pytest.raises(MedSynthError, match=what) as error:
            ReaderStudy.create_or_resume(results, real, synthetic, seed=0, n_per_class=n)
        assert "another -o" in str(error.value)
    ReaderStudy.create_or_resume(results, list(reversed(cases["real"])), cases["synthetic"], seed=0,
                                 n_per_class=2).close()


def test_start_race_names_no_overwrite_option(cases, tmp_path, monkeypatch):
    # Another start wrote the plan between the check and the write: the hint must not name --overwrite
    # (review has none).
    import MedSynthLib.evaluation.reader_study as reader_study

    results = tmp_path / "results"
    real_plan = reader_study.plan_study

    def racing_plan(*args, **kwargs):
        plan = real_plan(*args, **kwargs)
        results.mkdir(parents=True, exist_ok=True)
        (results / "study_plan.json").write_text("{}")
        return plan

    monkeypatch.setattr(reader_study, "plan_study", racing_plan)
    with pytest.raises(MedSynthError) as error:
        ReaderStudy.create_or_resume(results, cases["real"], cases["synthetic"], seed=0, n_per_class=1)
    assert "--overwrite" not in str(error.value) and "study_plan.json" in str(error.value)
    assert (results / "study_plan.json").read_text() == "{}"


@pytest.mark.parametrize("confidence", [2.7, 2.0, True, "abc", None, "2"])
def test_study_page_refuses_crafted_confidences(cases, tmp_path, confidence):
    study, app = _study_app(cases, tmp_path)
    item = app._current
    app.submit(item.item_id, "real", confidence)
    assert app.state.status.startswith("not saved") and "confidence" in app.state.status
    assert study.answered() == set() and app._current is item
    for answer in (1, ["real"], None):
        app.submit(item.item_id, answer, 2)
        assert app.state.status.startswith("not saved") and study.answered() == set()
    app.submit(item.item_id, "real", 2)
    assert study.answered() == {item.item_id}


def test_review_page_refuses_crafted_ratings_and_case_indices(cases, tmp_path):
    if find_spec("trame_slicer") is None:
        pytest.skip("trame_slicer not installed (pip install -e '.[web]')")
    from MedSynthWeb.cli import review_entries
    from MedSynthWeb.review_app import ReviewApp

    case = make_synthetic_case(tmp_path, 3)
    before = (case / "provenance.json").read_bytes()
    app = ReviewApp(review_entries([case, cases["real"][0]], []))
    for rating in (3.6, 3.0, True, "abc", None, "3", 9):
        app.save(0, rating, "note")
        assert app.state.status.startswith("not saved") and "rating" in app.state.status, (rating, app.state.status)
    for index in (99, -1, True, "0", 1.0, None):
        app.save(index, 3, "note")
        assert app.state.status.startswith("not saved") and "case" in app.state.status, (index, app.state.status)
        app._on_case(index)
        assert "case" in app.state.status, (index, app.state.status)
    app.save(0, 3, 7)
    assert app.state.status.startswith("not saved") and "note" in app.state.status
    assert (case / "provenance.json").read_bytes() == before
    app.save(0, 3, "fine")
    assert json.loads((case / "provenance.json").read_text())["review"]["rating"] == 3


# --- only the page's own origin may connect (cross-site websocket hijacking) -----------------------


def _server_missing() -> str | None:
    missing = None if find_spec("trame_slicer") else "trame_slicer not installed (pip install -e '.[web]')"
    if missing and os.environ.get("CI", "").lower() == "true":
        pytest.fail(missing)
    return missing


def _wslink(port: int, origin: str | None, secret: str = "wslink-secret", host: str | None = None,
            cookie: str | None = None) -> int | dict:
    """Connect to ``ws://127.0.0.1:PORT/ws`` as a page at ``origin`` would (``host``: the Host header, as after a
    DNS rebinding) and say wslink's hello with ``secret``.  Returns the HTTP status that refused the handshake, or
    ``{"hello": reply}`` with the page's state added as ``"state"`` where the hello was accepted."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import aiohttp
    import msgpack
    from wslink.chunking import UnChunker, generate_chunks

    headers = {**({"Origin": origin} if origin else {}), **({"Host": host} if host else {}),
               **({"Cookie": cookie} if cookie else {})}

    async def call(ws, unchunker: UnChunker, rpc_id: str, method: str, args: list) -> dict:
        message = msgpack.packb({"wslink": "1.0", "id": rpc_id, "method": method, "args": args, "kwargs": {}})
        for chunk in generate_chunks(message, 0):
            await ws.send_bytes(chunk)
        while True:
            received = await ws.receive(timeout=30)
            if received.type != aiohttp.WSMsgType.BINARY:
                return {"closed": str(received.type)}
            reply = unchunker.process_chunk(received.data)
            if reply is not None and reply.get("id") == rpc_id:
                return reply

    async def run() -> int | dict:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(f"ws://127.0.0.1:{port}/ws", headers=headers) as ws:
                    unchunker = UnChunker()
                    unchunker.set_max_message_size(2**26)
                    hello = await call(ws, unchunker, "system:c0:0", "wslink.hello", [{"secret": secret}])
                    if "result" not in hello:
                        return {"hello": hello}
                    client = hello["result"]["clientID"]
                    state = await call(ws, unchunker, f"rpc:{client}:1", "trame.state.get", [])
                    return {"hello": hello, "state": state.get("result", {}).get("state")}
            except aiohttp.WSServerHandshakeError as error:
                return error.status

    # In a thread of its own: Playwright's sync API keeps an event loop running in this one.
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, run()).result()


def _session(port: int, origin: str | None, host: str | None = None,
             cookie: str | None = None) -> tuple[int, dict | None]:
    """POST the trame client's session request, as the page does before it connects: status and JSON reply."""
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json", **({"Origin": origin} if origin else {}),
               **({"Host": host} if host else {}), **({"Cookie": cookie} if cookie else {})}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/paraview/", data=b"{}", method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, None


def _page_cookie(port: int, token: str) -> str:
    """Open the printed address as the reader's browser does; the cookie it is given, as a Cookie header."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/?token={token}", timeout=30) as page:
        assert page.headers["Content-Security-Policy"] == "frame-ancestors 'none'"
        assert page.headers["X-Frame-Options"] == "DENY"
        set_cookie = page.headers["Set-Cookie"]
    assert set_cookie and "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie, set_cookie
    return set_cookie.split(";", 1)[0]


def _assert_only_own_origin(port: int, token: str) -> dict:
    """A foreign page, a page without an Origin and a DNS-rebound page are refused at the handshake; a program of
    another local user (any Origin it likes, no access token) is refused everything; the page's own origin,
    opened under the printed address, connects, but only with the per-launch secret it gets from the server.
    Returns the page's state."""
    import urllib.error
    import urllib.request

    own = f"http://127.0.0.1:{port}"
    # A local program that forges the page's own Origin and Host but never saw the printed address.
    for path in ("/", "/index.html", f"/?token={token[:-1]}", "/?token="):
        with pytest.raises(urllib.error.HTTPError, match="403"):
            urllib.request.urlopen(f"{own}{path}", timeout=30)
    assert _session(port, own) == (403, None)
    assert _session(port, own, cookie=f"medsynth_review_{port}=guess") == (403, None)
    assert _wslink(port, own) == 403
    cookie = _page_cookie(port, token)
    for origin, host in (("http://evil.example", None), (f"http://evil.example:{port}", None), ("null", None),
                         (None, None), (f"http://evil.example:{port}", f"evil.example:{port}"),
                         (f"http://127.0.0.1:{port + 1}", None), (f"https://127.0.0.1:{port}", None),
                         (f"http://localhost:{port}", None)):
        assert _wslink(port, origin, host=host, cookie=cookie) == 403, (origin, host)
        assert _session(port, origin, host, cookie=cookie) == (403, None), (origin, host)
    # The page's own origin with wslink's well-known default secret: connected, not authenticated.
    refused = _wslink(port, own, cookie=cookie)
    assert "result" not in refused["hello"] and "state" not in refused, refused
    status, session = _session(port, own, cookie=cookie)
    assert status == 200 and session["secret"] != "wslink-secret" and len(session["secret"]) >= 32, session
    assert session["sessionURL"] == "ws://USE_HOST/ws"
    assert _session(port, f"http://localhost:{port}", f"localhost:{port}", cookie)[1]["secret"] == session["secret"]
    accepted = _wslink(port, f"http://localhost:{port}", session["secret"], host=f"localhost:{port}", cookie=cookie)
    assert accepted["state"] is not None, accepted
    # The page itself: served under this computer's names only, and never inside another site's frame.
    request = urllib.request.Request(f"{own}/index.html", headers={"Cookie": cookie})
    with urllib.request.urlopen(request, timeout=30) as page:
        assert page.headers["Content-Security-Policy"] == "frame-ancestors 'none'"
        assert page.headers["X-Frame-Options"] == "DENY"
    with pytest.raises(urllib.error.HTTPError, match="403"):
        urllib.request.urlopen(urllib.request.Request(f"{own}/index.html",
                                                      headers={"Host": f"evil.example:{port}", "Cookie": cookie}),
                               timeout=30)
    return accepted["state"]


def test_review_page_refuses_other_origins(cases, tmp_path):
    # Any web page open in the reader's browser could connect to ws://127.0.0.1:PORT (browsers allow
    # cross-origin websockets), read the reviewer's note and save ratings in their name.
    if missing := _server_missing():
        pytest.skip(missing)
    synthetic = tmp_path / "synthetic_0"
    shutil.copytree(cases["synthetic"][0], synthetic)
    save_review(synthetic, 2, "private note")
    with Server([str(synthetic)], tmp_path / "review.log") as server:
        state = _assert_only_own_origin(server.port, server.token)
    assert state["note"] == "private note"  # what the page's own connection reads, and only it
    log = (tmp_path / "review.log").read_text()
    assert "refused GET /ws: Origin 'http://evil.example', only the page's own" in log, log[-3000:]
    assert "refused GET /ws: no Origin, only the page's own" in log, log[-3000:]
    assert log.count("'http://evil.example'") == 1, log[-3000:]  # refused twice, told once


def test_study_page_refuses_other_origins(cases, tmp_path):
    if missing := _server_missing():
        pytest.skip(missing)
    results = tmp_path / "results"
    args = ["--study", *map(str, cases["real"]), "--synthetic", *map(str, cases["synthetic"]),
            "-o", str(results), "--n-per-class", "1"]
    with Server(args, tmp_path / "study.log") as server:
        state = _assert_only_own_origin(server.port, server.token)
    assert state["item_id"] == "item-001"
    assert not (results / "responses.csv").exists() or "item-001" not in (results / "responses.csv").read_text()


def test_page_access_admits_this_servers_names_and_the_pages_own_origin():
    if missing := _server_missing():
        pytest.skip(missing)
    from MedSynthWeb.access import PageAccess

    def page(host: str, origin: str | None = "same") -> dict:
        return {"Host": host, **({"Origin": f"http://{host}" if origin == "same" else origin} if origin else {})}

    anywhere, named = PageAccess("0.0.0.0", 8080), PageAccess("ws12.example.org", 8080)
    for access, host in ((anywhere, f"{socket.gethostname()}:8080"), (anywhere, "192.168.0.4:8080"),
                         (anywhere, "[::1]:8080"), (named, "WS12.example.org:8080"), (named, "localhost:8080")):
        assert access.refusal("GET", "/ws", page(host)) is None, host
        assert access.refusal("POST", "/paraview/", page(host)) is None, host
        assert access.refusal("GET", "/index.html", page(host, None)) is None, host  # a page load has no Origin
    assert PageAccess("127.0.0.1", 80).refusal("GET", "/ws", page("localhost")) is None  # port 80 left out
    for host in ("ws12.example.org:8080", "ws12.example.org:8081", "evil.example:8080@127.0.0.1:8080",
                 "127.0.0.1:8080/x", "", "999.1.1.1:8080"):
        assert "is not this server" in PageAccess("127.0.0.1", 8080).refusal("GET", "/index.html", page(host, None))
    for origin in (None, "null", "http://evil.example", "http://localhost:8080", "http://127.0.0.1:8080/"):
        for method, path in (("GET", "/ws"), ("POST", "/paraview/"), ("PUT", "/index.html")):
            refusal = named.refusal(method, path, page("127.0.0.1:8080", origin))
            assert refusal and "only the page's own (http://127.0.0.1:8080)" in refusal, (origin, method, path)
    upgrade = {**page("127.0.0.1:8080", "http://evil.example"), "Upgrade": "websocket"}
    assert "Origin" in named.refusal("GET", "/ws/", upgrade)


def test_page_access_admits_only_the_printed_token_or_its_cookie():
    # Origin and Host stop other web pages, not other programs on a shared computer: those send any headers.
    if missing := _server_missing():
        pytest.skip(missing)
    from MedSynthWeb.access import PageAccess

    access, other = PageAccess("127.0.0.1", 8080), PageAccess("127.0.0.1", 8080)
    assert access.token != other.token and len(access.token) >= 32  # drawn per start
    assert access.address("127.0.0.1") == f"http://127.0.0.1:8080/?token={access.token}"
    assert access.token_refusal(access.token, None) is None
    assert access.token_refusal(None, access.token) is None
    for query, cookie in ((None, None), ("", None), (other.token, None), (None, other.token),
                          (access.token[:-1], None), (access.token + "x", access.token[:-1])):
        refusal = access.token_refusal(query, cookie)
        assert refusal and "access token" in refusal, (query, cookie)
    assert access.cookie_name == "medsynth_review_8080"  # one per port: two servers keep their own

