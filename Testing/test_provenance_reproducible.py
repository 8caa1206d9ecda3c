"""A synthetic case's provenance names everything that shaped its images, so that it can be made again.

Audit: the model was recorded by name and weights sha256 only, yet its config (intensity statistics, appearance
prior) changes every image: two models with the same weights and different configs gave different images with the
same provenance.  And after a GPU out-of-memory the network ran again in smaller sliding windows with Gaussian
blending (other images), while the record said only the device.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import rewrite_model_config, write_random_model
from MedSynthLib.export.sanitise import sanitise_provenance
from MedSynthLib.schema.grid import Grid, LabelMap
from MedSynthLib.schema.labels import Label
from MedSynthLib.schema.provenance import SynthesisRecord
from MedSynthLib.synthesis.inference import Synthesizer
from MedSynthLib.synthesis.models import config_sha256, resolve_model
from MedSynthLib.synthesis.networks import MODALITY_ORDER
from MedSynthLib.synthesis.synthesize import SynthesisEngine, write_synthesis

INTENSITY = {m: {"low": 0.0, "high": 1000.0} for m in MODALITY_ORDER}


def small_brain(size: int = 20) -> LabelMap:
    """A ball of white matter in grey matter with a tumour core, ``size``^3 voxels of 1 mm."""
    grid = Grid((size,) * 3, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    r = np.sqrt(sum((axis - (size - 1) / 2) ** 2 for axis in np.indices(grid.shape, dtype=float)))
    labels = np.zeros(grid.shape, np.uint8)
    labels[r < 0.4 * size] = Label.GM
    labels[r < 0.3 * size] = Label.WM
    labels[r < 0.12 * size] = Label.ET
    return LabelMap(labels, grid)


def test_models_with_the_same_weights_and_different_configs_leave_different_provenance(tmp_path) -> None:
    first = write_random_model(tmp_path / "first", INTENSITY, seed=3)
    second = tmp_path / "second"
    shutil.copytree(first, second)  # the same weights, as `medsynth appearance` copies them
    config = json.loads((second / "config.json").read_text())
    config["intensity"] = {m: {"low": 0.0, "high": 2000.0} for m in MODALITY_ORDER}  # other scanner units
    rewrite_model_config(second, config)

    labelmap = small_brain()
    cards = [resolve_model(first), resolve_model(second)]
    assert cards[0].sha256 == cards[1].sha256
    results = [SynthesisEngine(card, "cpu", "fp32").synthesize(labelmap, seed=1) for card in cards]
    assert not np.array_equal(results[0].images["t1"], results[1].images["t1"])

    models = [result.provenance["model"] for result in results]
    assert models[0] != models[1]
    for card, model in zip(cards, models):
        assert model["config_sha256"] == config_sha256(card.config) == card.config["config_sha256"]

    # Written, read back as a typed record, and exported: the config's checksum identifies no one and stays.
    folder = write_synthesis(results[1], tmp_path / "case")
    raw = json.loads((folder / "provenance.json").read_text())
    assert SynthesisRecord.from_json(raw).model.config_sha256 == models[1]["config_sha256"]
    exported, _ = sanitise_provenance(raw, labelmap.grid)
    assert exported["model"]["config_sha256"] == models[1]["config_sha256"]


@pytest.fixture()
def engine(tmp_path) -> SynthesisEngine:
    return SynthesisEngine(resolve_model(write_random_model(tmp_path / "tiny", INTENSITY, seed=5)), "cpu", "fp32")


def test_the_inference_path_is_recorded_whole_volume(engine) -> None:
    provenance = engine.synthesize(small_brain(), seed=0).provenance
    passes = provenance["inference"]
    assert [p["part"] for p in passes] == ["direct", "mirrored"]
    assert all(p["method"] == "whole-volume" and p["device"] == "cpu" and p["precision"] == "fp32" for p in passes)
    assert all("window" not in p and "overlap" not in p and "blending" not in p for p in passes)


def test_a_fallback_after_out_of_memory_is_recorded(engine, monkeypatch) -> None:
    """A whole-volume run that runs out of GPU memory is retried in 128^3, 64^3, then 32^3 sliding windows (the last
    fit here): the record says so."""
    labelmap = small_brain(44)  # a brain box larger than 32^3 windows
    whole = engine.synthesize(labelmap, seed=0)
    real_run = Synthesizer._run

    def run(self, onehot, roi, keep_layout=False):
        if roi is None or roi > 32:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_run(self, onehot, roi, keep_layout)

    monkeypatch.setattr(Synthesizer, "_run", run)
    fallback = engine.synthesize(labelmap, seed=0)
    assert not np.array_equal(whole.normalized, fallback.normalized)  # another path, other images

    passes = fallback.provenance["inference"]
    assert [p["part"] for p in passes] == ["direct", "mirrored"]
    for p in passes:
        assert p["method"] == "sliding-window" and p["blending"] == "gaussian"
        assert p["window"] == [32, 32, 32]
        assert p["overlap"] in (0.25, 0.5)
        assert p["out_of_memory_retries"] == 3
    # The typed record (what is read back and exported) keeps all of it.
    record = SynthesisRecord.from_json(json.loads(json.dumps(fallback.provenance)))
    assert record.to_json()["inference"] == passes
    assert record.to_json(for_export=True)["inference"] == passes
    # The next synthesis starts afresh: its record holds only its own passes.
    monkeypatch.setattr(Synthesizer, "_run", real_run)
    assert engine.synthesize(labelmap, seed=0).provenance["inference"] == whole.provenance["inference"]


@pytest.mark.timeout(60)
def test_out_of_memory_with_nothing_left_to_fall_back_to_is_raised_not_retried_for_ever(engine, monkeypatch) -> None:
    """Once on the CPU with the smallest windows, another out-of-memory error has nowhere to go: the fallback
    started over from whole volume on the CPU, endlessly."""
    calls = []

    def run(self, onehot, roi, keep_layout=False):
        calls.append(roi)
        if len(calls) > 50:
            pytest.fail(f"retried {len(calls)} times: {calls[:12]} ...")
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(Synthesizer, "_run", run)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        engine.synthesize(small_brain(44), seed=0)
    assert len(calls) == 4, calls  # whole volume, then 128^3 (clipped), 64^3 and 32^3 windows


def test_an_export_names_a_registered_model_only_with_the_config_the_case_was_made_with(tmp_path, monkeypatch) -> None:
    """A registry name re-registered with another config (same weights) is another model: the export of a case made
    with the first must not name it, while the weights' and config's sha256 still say which model it was."""
    from MedSynthLib.export.sanitise import UNREGISTERED_MODEL
    from MedSynthLib.synthesis.models import register_model

    monkeypatch.setenv("MEDSYNTH_MODELS", str(tmp_path / "registry"))
    source = write_random_model(tmp_path / "tiny", INTENSITY, seed=3)
    labelmap = small_brain()
    result = SynthesisEngine(register_model(source, "tiny"), "cpu", "fp32").synthesize(labelmap, seed=0)
    raw = json.loads(json.dumps(result.provenance))
    assert sanitise_provenance(raw, labelmap.grid)[0]["model"]["name"] == "tiny"

    config = json.loads((source / "config.json").read_text())
    config["intensity"] = {m: {"low": 0.0, "high": 2000.0} for m in MODALITY_ORDER}
    rewrite_model_config(source, config)
    register_model(source, "tiny", overwrite=True)
    model = sanitise_provenance(raw, labelmap.grid)[0]["model"]
    assert model == {"name": UNREGISTERED_MODEL, "sha256": raw["model"]["sha256"],
                     "config_sha256": raw["model"]["config_sha256"]}


def test_a_rerendered_region_adds_its_passes(engine) -> None:
    labelmap = small_brain()
    previous = engine.synthesize(labelmap, seed=0)
    edited = labelmap.array.copy()
    edited[edited == Label.ET] = Label.NCR
    result = engine.rerender(previous, LabelMap(edited, labelmap.grid), margin=4)
    passes = result.provenance["inference"]
    assert passes[:2] == previous.provenance["inference"]
    assert [(p["part"], p.get("rerender")) for p in passes[2:]] == [("direct", True), ("mirrored", True)]
    assert SynthesisRecord.from_json(json.loads(json.dumps(result.provenance))).to_json()["inference"] == passes
