"""A checkpoint or a starting model of another network, and a checkpoint with NaN weights.

A resume from a checkpoint of another network printed torch's load_state_dict text cut at 160 characters ("size
mismatch for net.bottleneck.0.conv.weight: copying a param with shape torch.Size([16, 8, 3, 3, 3]) from check)");
``train --init`` of a model of another network printed both network configs whole.  Both now name the file and the
fields that differ.  A checkpoint whose weights hold NaN (its sha256 sealed again) was resumed and the run stopped
later, blaming training.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_random_model
from MedSynthLib.cli import main
from MedSynthLib.schema.errors import InputError
from MedSynthLib.synthesis.networks import Generator, NetworkConfig, build_discriminator
from MedSynthLib.training.checkpoint import read_checkpoint, write_checkpoint
from test_training import (TINY_NETWORK, _one_error_line, brats_data, copy_run, four_step_run,  # noqa: F401
                           resume_args, rewind, snapshot, train_args, write_config)

SPADE = dict(kind="spade", strides=(2, 2), bottleneck_blocks=1, spade_hidden=4, style_dim=4, disc_channels=4,
             disc_layers=2)


def _checkpoint(folder: Path, network: NetworkConfig, *, record: bool = True) -> Path:
    """A GAN checkpoint of ``network`` (generator, discriminator, their optimizers) at step 4."""
    torch.manual_seed(0)
    generator, discriminator = Generator(network), build_discriminator(network)
    optimizers = {"optimizer_g": torch.optim.Adam(generator.parameters()),
                  "optimizer_d": torch.optim.Adam(discriminator.parameters())}
    write_checkpoint(folder, 4, {"generator": generator, "discriminator": discriminator}, optimizers)
    if not record:  # as a checkpoint written before checkpoints recorded their network
        state = json.loads((folder / "state.json").read_text())
        state.pop("networks", None)
        (folder / "state.json").write_text(json.dumps(state))
    return folder


def _read_into(folder: Path, network: NetworkConfig) -> str:
    generator, discriminator = Generator(network), build_discriminator(network)
    with pytest.raises(InputError) as caught:
        read_checkpoint(folder, {"generator": generator, "discriminator": discriminator},
                        {"optimizer_g": torch.optim.Adam(generator.parameters()),
                         "optimizer_d": torch.optim.Adam(discriminator.parameters())})
    message = str(caught.value)
    assert "torch.Size" not in message and "size mismatch" not in message and "\n" not in message, message
    return message


@pytest.mark.parametrize("record", [True, False], ids=["recorded", "shapes only"])
@pytest.mark.parametrize("theirs, ours", [((4, 8, 16), (4, 8, 8)), ((4, 8, 8), (4, 8))],
                         ids=["widths", "levels"])
def test_a_checkpoint_of_another_network_names_the_fields_that_differ(tmp_path: Path, record, theirs, ours) -> None:
    strides = {len(theirs): (2,) * (len(theirs) - 1), len(ours): (2,) * (len(ours) - 1)}
    checkpoint = NetworkConfig(**dict(SPADE, channels=theirs, strides=strides[len(theirs)]))
    run = NetworkConfig(**dict(SPADE, channels=ours, strides=strides[len(ours)]))
    folder = _checkpoint(tmp_path / "step_0000004", checkpoint, record=record)
    message = _read_into(folder, run)
    assert str(folder / "generator.safetensors") in message, message
    assert f"channels {list(theirs)} in the checkpoint, {list(ours)} in this run's config" in message, message
    if len(theirs) != len(ours):
        assert f"strides {list(strides[len(theirs)])} in the checkpoint" in message, message
    assert "spade_hidden" not in message and "kind" not in message, message  # only what differs
    assert ("as its tensor shapes show" in message) != record, message  # the record is read where there is one


def test_a_checkpoint_of_another_discriminator_names_it(tmp_path: Path) -> None:
    checkpoint = NetworkConfig(**dict(SPADE, channels=(4, 8, 8), disc_channels=8))
    folder = _checkpoint(tmp_path / "step_0000004", checkpoint)
    message = _read_into(folder, NetworkConfig(**dict(SPADE, channels=(4, 8, 8))))
    assert "disc_channels 8 in the checkpoint, 4 in this run's config" in message, message


def test_resume_from_a_checkpoint_of_another_network_is_one_whole_line(phantom_brats: Path, four_step_run: Path,
                                                                       tmp_path: Path, capsys) -> None:
    """The audit's case: latest.json names a checkpoint another run (wider network) wrote."""
    run = rewind(copy_run(four_step_run, tmp_path / "run"))
    folder = run / "checkpoints" / "step_0000002"
    other = dict(TINY_NETWORK, channels=[4, 16])
    shutil.rmtree(folder)
    _checkpoint(folder, NetworkConfig.from_json(other), record=False)
    state = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps(dict(state, step=2)))
    before = snapshot(run)
    assert main(resume_args(phantom_brats, run)) == 2
    line = _one_error_line(capsys)
    assert str(folder / "generator.safetensors") in line, line
    assert "channels [4, 16] in the checkpoint, [4, 8] in this run's config" in line, line
    assert snapshot(run) == before


def test_init_from_a_model_of_another_network_names_the_fields_that_differ(phantom_brats: Path, tmp_path: Path,
                                                                           capsys) -> None:
    from MedSynthLib.synthesis.networks import MODALITY_ORDER

    model = write_random_model(tmp_path / "other", {m: {"low": 0.0, "high": 1000.0} for m in MODALITY_ORDER}, seed=1)
    config = write_config(tmp_path / "wide.json", network=dict(TINY_NETWORK, channels=[4, 16]))
    run = tmp_path / "run"
    assert main(train_args(phantom_brats, run, config, "--init", str(model))) == 2
    line = _one_error_line(capsys)
    assert str(model) in line
    assert "channels [4, 8] in the model, [4, 16] in the training config" in line, line
    assert "spatial_dims" not in line and "modalities" not in line, line  # not the whole configs
    assert not run.exists()


def test_resume_from_a_checkpoint_with_nan_weights_is_refused(phantom_brats: Path, four_step_run: Path,
                                                              tmp_path: Path, capsys) -> None:
    """NaN in the generator's weights, the checkpoint's sha256 sealed again: refused when loaded, not trained."""
    from safetensors.numpy import load_file, save_file

    run = rewind(copy_run(four_step_run, tmp_path / "run"))
    folder = run / "checkpoints" / "step_0000002"
    weights = folder / "generator.safetensors"
    tensors = load_file(str(weights))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].copy()
    tensors[key].flat[0] = np.nan
    save_file(tensors, str(weights))
    state = json.loads((folder / "state.json").read_text())
    state["files_sha256"][weights.name] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (folder / "state.json").write_text(json.dumps(state))
    before = snapshot(run)
    assert main(resume_args(phantom_brats, run)) == 2
    line = _one_error_line(capsys)
    assert str(weights) in line and "NaN" in line and key in line, line
    assert snapshot(run) == before
    assert not (run / "model").exists()
