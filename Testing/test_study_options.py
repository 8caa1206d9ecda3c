"""``medsynth study``'s options that override its config are checked as the config's own values are.

``--threads`` was set on the config after the config was checked, so a value the config refuses (``threads``
lies in [1, 4096]) reached ``torch.set_num_threads`` unchecked.
"""

from __future__ import annotations

import pytest

from MedSynthLib.cli import main
from MedSynthLib.schema.errors import InputError
from MedSynthLib.study.config import load_config


def _study(tmp_path, *extra: str) -> list[str]:
    return ["study", "--data", str(tmp_path / "cases"), "-o", str(tmp_path / "report"), "--config", "micro",
            "--device", "cpu", "--quiet", *extra]


@pytest.mark.parametrize("threads", ["4097", "100000"])
def test_threads_the_config_refuses_are_refused_on_the_command_line(tmp_path, capsys, threads):
    (tmp_path / "cases").mkdir()
    assert main(_study(tmp_path, "--threads", threads)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "--threads" in lines[0] and threads in lines[0] and "[1, 4096]" in lines[0], lines[0]
    assert not (tmp_path / "report").exists() and not (tmp_path / "report.cache").exists()


def test_the_overrides_reach_the_study(tmp_path, monkeypatch):
    import MedSynthLib.study.run as run

    seen = {}

    def captured(data, output, config, **kwargs):
        seen["config"] = config
        raise KeyboardInterrupt  # stop before any study work: the config is what this test reads

    monkeypatch.setattr(run, "run_study", captured)
    (tmp_path / "cases").mkdir()
    assert main(_study(tmp_path, "--threads", "3", "--gan-model", "runs/fold{fold}/model")) == 130
    config = seen["config"]
    assert (config.threads, config.gan_model) == (3, "runs/fold{fold}/model")
    expected = load_config("micro").to_json() | {"threads": 3, "gan_model": "runs/fold{fold}/model"}
    assert config.to_json() == expected


def test_with_options_checks_the_new_values_and_keeps_the_rest():
    config = load_config("micro")
    with pytest.raises(InputError, match=r"^--threads: threads = 0 is outside \[1, 4096\]"):
        config.with_options({"threads": 0}, "--threads")
    with pytest.raises(InputError, match="--seed: seed"):
        config.with_options({"seed": -1}, "--seed")
    changed = config.with_options({"threads": 4096}, "--threads")
    assert changed.to_json() == config.to_json() | {"threads": 4096}
    assert config.to_json() == load_config("micro").to_json(), "the config it was made from is left as it was"
