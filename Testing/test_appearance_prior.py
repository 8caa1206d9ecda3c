"""The appearance prior: a seed's code drawn from the distribution of the training patches' codes.

The moments, the seed -> code map, the record's checks, its use by synthesis (and its provenance), its fit at
export and by ``medsynth appearance`` for a model trained without one (the same prior as the export's).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import rewrite_model_config, training_cache_of
from MedSynthLib.cli import main
from MedSynthLib.schema.errors import InputError
from MedSynthLib.schema.provenance import SynthesisRecord
from MedSynthLib.synthesis.appearance import GAUSSIAN, AppearancePrior, aggregate_posterior, fit_appearance_prior
from MedSynthLib.synthesis.models import resolve_model
from MedSynthLib.synthesis.networks import style_code
from MedSynthLib.synthesis.synthesize import SynthesisEngine
from test_synthesis_seed import PLAIN, STYLED, _model, synthetic_brain
from test_training_spade import CONFIG

pytestmark = pytest.mark.usefixtures("torch_threads")


def _prior(dim: int = 3) -> AppearancePrior:
    covariance = np.array([[0.5, 0.2, 0.0], [0.2, 0.8, -0.1], [0.0, -0.1, 0.3]])[:dim, :dim]
    return AppearancePrior(tuple([0.4, -0.2, 0.1][:dim]), tuple(map(tuple, covariance.tolist())), 50, 7)


def test_aggregate_posterior_has_the_moments_of_the_mixture_of_posteriors() -> None:
    rng = np.random.default_rng(0)
    means = rng.normal([0.3, -1.0], [0.2, 0.5], (400, 2))
    means[:, 1] += 0.8 * means[:, 0]  # correlated patch means
    log_variances = np.log(rng.uniform(0.3, 0.9, (400, 2)))
    prior = aggregate_posterior(means, log_variances, seed=3)
    # Draws from the mixture itself: one posterior per patch, many codes from each.
    draws = (means[:, None] + np.exp(0.5 * log_variances)[:, None] * rng.standard_normal((400, 500, 2))).reshape(-1, 2)
    np.testing.assert_allclose(prior.mean, draws.mean(0), atol=0.01)
    np.testing.assert_allclose(prior.covariance, np.cov(draws, rowvar=False), atol=0.01)
    assert prior.patches == 400 and prior.seed == 3
    with pytest.raises(ValueError, match="patches >= 2"):
        aggregate_posterior(means[:1], log_variances[:1], seed=0)


class _RecordingSampler:
    """Hands out a fixed patch and remembers nothing: the fit is what is under test."""

    def sample(self, volumes, seed, step, rank, batch_size, device):
        return torch.zeros(1, 4, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4, 4, 4)


def test_the_fit_keeps_no_encoder_output_alive() -> None:
    # A kept view of each patch's tiny (1, style_dim) output pinned the heap between the 96-cubed patches'
    # buffers: a 96-cubed export's fit grew by ~3.5 MB a patch (1.2 -> 4.2 GB over 1000 patches, session 34).
    import weakref

    outputs: list[weakref.ref] = []
    alive_before: list[int] = []  # earlier patches' outputs still held when the next patch is encoded

    def encode(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Tensors over numpy buffers: a weak reference to the buffer sees whether anything still holds it.
        alive_before.append(sum(ref() is not None for ref in outputs))
        buffers = np.random.default_rng(len(outputs)).standard_normal((2, 1, 3)).astype(np.float32)
        outputs.append(weakref.ref(buffers))
        return torch.from_numpy(buffers[0]), torch.from_numpy(buffers[1])

    prior = fit_appearance_prior(encode, [None], _RecordingSampler(), 5, seed=2)
    assert prior.patches == 5 and alive_before == [0] * 5


def test_a_seed_draws_one_code_and_the_codes_follow_the_prior() -> None:
    prior = _prior()
    assert torch.equal(prior.code(5), prior.code(5))
    assert not torch.equal(prior.code(5), prior.code(6))
    assert prior.code(5).shape == (1, 3) and prior.code(5).dtype == torch.float32
    codes = torch.cat([prior.code(seed) for seed in range(4000)]).double().numpy()
    np.testing.assert_allclose(codes.mean(0), prior.mean, atol=0.05)
    np.testing.assert_allclose(np.cov(codes, rowvar=False), prior.covariance, atol=0.05)
    # The code is the seed's standard-normal draw, moved and shaped: the seed keeps its meaning across priors.
    eps = style_code(5, 3).double().numpy()
    np.testing.assert_allclose(prior.code(5).numpy(), np.asarray(prior.mean) + eps @ prior.cholesky().T, rtol=1e-6)


def test_the_spread_scales_the_draws_distance_from_the_mean() -> None:
    prior = _prior()
    mean = np.asarray(prior.mean)
    for seed in (0, 5, 123):
        base = prior.code(seed).double().numpy() - mean
        for spread in (0.0, 0.5, 1.5, 2.0):
            np.testing.assert_allclose(prior.code(seed, spread).double().numpy() - mean, spread * base, atol=1e-6)
    assert torch.equal(prior.code(5, 1.0), prior.code(5))
    assert torch.equal(prior.code(5, 0.0), prior.code(6, 0.0))  # spread 0: every seed the mean appearance
    codes = torch.cat([prior.code(seed, 1.5) for seed in range(4000)]).double().numpy()
    np.testing.assert_allclose(np.cov(codes, rowvar=False), 1.5 ** 2 * np.asarray(prior.covariance), atol=0.08)


@pytest.mark.parametrize("value", [-0.1, 2.01, 3.0, float("nan"), float("inf"), True, "1"])
def test_a_spread_outside_its_range_is_refused_by_name(value) -> None:
    from MedSynthLib.schema.errors import MedSynthError
    from MedSynthLib.synthesis.appearance import SPREAD_RANGE, check_appearance_spread

    assert SPREAD_RANGE == (0.0, 2.0)
    with pytest.raises(MedSynthError, match="--appearance-spread must be a number from 0 to 2"):
        check_appearance_spread(value, "--appearance-spread")
    assert check_appearance_spread(1, "x") == 1.0 and isinstance(check_appearance_spread(0, "x"), float)


def test_each_model_accepts_spreads_up_to_its_own_limit() -> None:
    from types import SimpleNamespace

    from MedSynthLib.schema.errors import MedSynthError
    from MedSynthLib.synthesis.appearance import check_model_spread, spread_limit

    without_record = SimpleNamespace(name="plain", appearance=None)
    undeclared = SimpleNamespace(name="undeclared", appearance=_prior())
    declared = SimpleNamespace(name="wide", appearance=dataclasses.replace(_prior(), spread_limit=1.2))
    assert spread_limit(without_record) == spread_limit(undeclared) == 1.0 and spread_limit(declared) == 1.2
    for model in (without_record, undeclared):
        assert check_model_spread(1, model, "--appearance-spread") == 1.0
        with pytest.raises(MedSynthError, match=rf"^--appearance-spread 1.1 is wider than model {model.name} "
                                                r"accepts \(up to 1: "):
            check_model_spread(1.1, model, "--appearance-spread")
    assert check_model_spread(1.2, declared) == 1.2 and check_model_spread(0, declared) == 0.0
    with pytest.raises(MedSynthError, match=r"appearance spread 1.25 is wider than model wide accepts \(up to 1.2"):
        check_model_spread(1.25, declared)
    with pytest.raises(MedSynthError, match="must be a number from 0 to 2"):  # the range first
        check_model_spread(-1, declared)


def test_the_record_round_trips() -> None:
    prior = _prior()
    record = json.loads(json.dumps(prior.to_json()))
    assert record["kind"] == GAUSSIAN and "spread_limit" not in record  # records without a limit stay as they were
    assert AppearancePrior.from_json(record, "config.json", 3) == prior
    wide = dataclasses.replace(prior, spread_limit=1.5)
    record = json.loads(json.dumps(wide.to_json()))
    assert record["spread_limit"] == 1.5 and AppearancePrior.from_json(record, "config.json", 3) == wide


@pytest.mark.parametrize("change, problem", [
    ({"kind": "other"}, "must be an object"),
    ({"mean": [0.0, 1.0]}, "'mean' must be 3 finite numbers"),
    ({"mean": [0.0, float("nan"), 1.0]}, "'mean' must be 3 finite numbers"),
    ({"mean": [0.0, True, 1.0]}, "'mean' must be 3 finite numbers"),
    ({"covariance": [[1, 0, 0], [0, 1, 0]]}, "'covariance' must be 3 rows of 3"),
    ({"covariance": [[1, 0.5, 0], [0, 1, 0], [0, 0, 1]]}, "not symmetric"),
    ({"covariance": [[1, 0, 0], [0, -1, 0], [0, 0, 1]]}, "not positive definite"),
    ({"patches": 1}, "'patches' must be an integer of at least 2"),
    ({"seed": 1.5}, "'seed' must be an integer"),
    ({"spread_limit": 0.5}, "'spread_limit' must be a number from 1 to 2, got 0.5"),
    ({"spread_limit": 2.5}, "'spread_limit' must be a number from 1 to 2"),
    ({"spread_limit": True}, "'spread_limit' must be a number from 1 to 2"),
    ({"spread_limit": "1.2"}, "'spread_limit' must be a number from 1 to 2"),
])
def test_a_bad_record_is_refused_naming_the_file(change, problem) -> None:
    record = dict(_prior().to_json(), **change)
    with pytest.raises(InputError, match=problem) as caught:
        AppearancePrior.from_json(record, Path("model/config.json"), 3)
    assert str(caught.value).startswith("model/config.json: model config: 'appearance'")
    with pytest.raises(InputError, match="no appearance code"):
        AppearancePrior.from_json(_prior().to_json(), "config.json", 0)


def _styled_model_with(folder: Path, source: Path, appearance: dict | None) -> Path:
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config["appearance"] = appearance
    rewrite_model_config(folder, config)
    return folder


@pytest.fixture(scope="module")
def styled_model(tmp_path_factory) -> Path:
    return _model(tmp_path_factory.mktemp("models") / "styled", STYLED)


def test_synthesis_draws_from_the_models_prior_and_records_the_code(styled_model, tmp_path) -> None:
    covariance = np.diag([0.04, 0.09, 0.01, 0.25])
    record = AppearancePrior((1.0, -1.0, 0.5, 0.0), tuple(map(tuple, covariance.tolist())), 10, 0).to_json()
    with_prior = resolve_model(_styled_model_with(tmp_path / "with", styled_model, record))
    assert with_prior.appearance is not None and resolve_model(styled_model).appearance is None
    labelmap = synthetic_brain()
    engine = SynthesisEngine(with_prior, "cpu", "fp32")
    result = engine.synthesize(labelmap, seed=3)
    expected = with_prior.appearance.code(3)
    assert result.provenance["appearance_code"] == [float(v) for v in expected[0]]
    # The recorded code makes the case again: the network given that code paints the same images.
    engine.synth.style = torch.tensor([result.provenance["appearance_code"]], dtype=torch.float32)
    assert np.array_equal(engine.synth.predict(labelmap.array), result.normalized)
    # A model without the record draws the seed's standard normal, as before.
    plain = SynthesisEngine(resolve_model(styled_model), "cpu", "fp32").synthesize(labelmap, seed=3)
    assert plain.provenance["appearance_code"] == [float(v) for v in style_code(3, 4)[0]]
    assert not np.array_equal(plain.normalized, result.normalized)
    # The typed provenance keeps the code; a record without one (older cases) has none.
    parsed = SynthesisRecord.from_json(json.loads(json.dumps(result.provenance)))
    assert parsed.appearance_code == tuple(result.provenance["appearance_code"])
    assert "appearance_code" not in SynthesisRecord().to_json()
    assert parsed.appearance_spread == result.provenance["appearance_spread"] == 1.0


def test_the_engines_spread_scales_the_code_it_records_and_can_change_between_cases(styled_model, tmp_path) -> None:
    from MedSynthLib.schema.errors import MedSynthError

    covariance = np.diag([0.04, 0.09, 0.01, 0.25])
    record = AppearancePrior((1.0, -1.0, 0.5, 0.0), tuple(map(tuple, covariance.tolist())), 10, 0).to_json()
    model = resolve_model(_styled_model_with(tmp_path / "with", styled_model, record))
    labelmap = synthetic_brain()
    engine = SynthesisEngine(model, "cpu", "fp32", appearance_spread=0.0)
    mean_case = engine.synthesize(labelmap, seed=3)
    assert mean_case.provenance["appearance_code"] == [float(v) for v in model.appearance.mean]
    assert mean_case.provenance["appearance_spread"] == 0.0 and mean_case.provenance["seed_effective"] is False
    assert np.array_equal(engine.synthesize(labelmap, seed=4).normalized, mean_case.normalized)
    distances = []
    for spread in (0.5, 1.0):
        engine.appearance_spread = spread
        case = engine.synthesize(labelmap, seed=3)
        assert case.provenance["appearance_code"] == [float(v) for v in model.appearance.code(3, spread)[0]]
        assert case.provenance["appearance_spread"] == spread and case.provenance["seed_effective"] is True
        distances.append(float(np.abs(case.normalized - mean_case.normalized).mean()))
    assert 0 < distances[0] < distances[1]  # the further the code, the further the case from the mean one
    with pytest.raises(MedSynthError, match=rf"appearance spread 1.5 is wider than model {model.name} accepts "
                                            r"\(up to 1:"):
        engine.appearance_spread = 1.5
    with pytest.raises(MedSynthError, match="appearance spread must be a number from 0 to 2, got 2.5"):
        engine.appearance_spread = 2.5
    assert engine.appearance_spread == 1.0  # a refused value changes nothing
    with pytest.raises(MedSynthError, match="appearance spread must be a number"):
        SynthesisEngine(model, "cpu", "fp32", appearance_spread=float("nan"))
    # A model without the prior scales the seed's standard normal.
    plain = SynthesisEngine(resolve_model(styled_model), "cpu", "fp32", appearance_spread=0.5)
    assert plain.synthesize(labelmap, seed=3).provenance["appearance_code"] == pytest.approx(
        [0.5 * float(v) for v in style_code(3, 4)[0]])


def test_a_bad_record_in_a_model_is_one_line_exit_2(styled_model, tmp_path, capsys) -> None:
    from MedSynthLib.schema.labelmap import write_label_map

    folder = _styled_model_with(tmp_path / "bad", styled_model, dict(_prior(3).to_json()))  # 3 != style_dim 4
    labels = write_label_map(synthetic_brain(), tmp_path / "labels.nii.gz")
    code = main(["synthesize", str(labels), "-o", str(tmp_path / "out"), "--model", str(folder), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0] == (f"medsynth: error: {folder / 'config.json'}: model config: 'appearance' 'mean' must be 4 "
                      "finite numbers (the network's style_dim)")
    assert not (tmp_path / "out").exists()


def test_a_spread_limit_declared_at_registration_widens_that_copy_only(styled_model, tmp_path, monkeypatch,
                                                                       capsys) -> None:
    from MedSynthLib.schema.labelmap import write_label_map

    record = AppearancePrior((1.0, -1.0, 0.5, 0.0), tuple(map(tuple, np.diag([0.04, 0.09, 0.01, 0.25]).tolist())),
                             10, 0).to_json()
    source = _styled_model_with(tmp_path / "source", styled_model, record)
    before = (source / "config.json").read_bytes()
    monkeypatch.setenv("MEDSYNTH_MODELS", str(tmp_path / "registry"))
    labels = write_label_map(synthetic_brain(), tmp_path / "labels.nii.gz")

    def synthesize(model: str, out: str, spread: str) -> int:
        return main(["synthesize", str(labels), "-o", str(tmp_path / out), "--model", model, "--device", "cpu",
                     "--appearance-spread", spread])

    # Not declared: held to 1, in one line, exit 2, nothing written.
    assert synthesize(str(source), "refused", "1.2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"medsynth: error: --appearance-spread 1.2 is wider than model "
                                               f"{resolve_model(source).name} accepts (up to 1:")
    assert not (tmp_path / "refused").exists()
    assert main(["models", "--register", str(source), "--name", "wide", "--appearance-spread-limit", "1.2"]) == 0
    assert "appearance spread up to 1.2" in capsys.readouterr().out
    assert main(["models"]) == 0
    assert "\n  spread   0 to 1.2 (--appearance-spread)" in capsys.readouterr().out
    registered = resolve_model("wide")
    assert registered.appearance.spread_limit == 1.2 and registered.sha256 == resolve_model(source).sha256
    assert (source / "config.json").read_bytes() == before  # the trained folder is left as it was
    assert synthesize("wide", "wide", "1.2") == 0
    provenance = json.loads((tmp_path / "wide" / "provenance.json").read_text())
    assert provenance["appearance_spread"] == 1.2
    assert provenance["appearance_code"] == [float(v) for v in registered.appearance.code(0, 1.2)[0]]
    assert synthesize("wide", "wider", "1.3") == 2 and "(up to 1.2:" in capsys.readouterr().err
    # Refused at registration: a model without a prior, a limit out of range, the option without --register.
    for args, words in (([str(styled_model), "--name", "bare", "--appearance-spread-limit", "1.2"],
                         "applies to a model with an appearance prior"),
                        ([str(source), "--name", "too_wide", "--appearance-spread-limit", "2.5"],
                         "'spread_limit' must be a number from 1 to 2, got 2.5")):
        assert main(["models", "--register", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "registry" / "bare").exists() and not (tmp_path / "registry" / "too_wide").exists()
    assert main(["models", "--appearance-spread-limit", "1.2"]) == 2
    assert "applies with --register only" in capsys.readouterr().err


def _train(data: Path, run: Path, config: dict, tmp_path: Path) -> Path:
    path = tmp_path / f"{run.name}.json"
    path.write_text(json.dumps(config))
    args = ["train", "--data", str(data), "-o", str(run), "--config", str(path), "--device", "cpu",
            "--cache", str(training_cache_of(data))]
    assert main(args + ["--command-line", "medsynth " + " ".join(args)]) == 0
    return run / "model"


def test_export_fits_the_prior_and_medsynth_appearance_fits_the_same_one(phantom_brats, tmp_path, capsys) -> None:
    short = dict(CONFIG, steps=2, val_every=2, checkpoint_every=2)
    fitted = resolve_model(_train(phantom_brats, tmp_path / "fitted", dict(short, appearance_patches=6), tmp_path))
    assert fitted.appearance is not None and fitted.appearance.patches == 6
    assert fitted.appearance.style_dim == CONFIG["network"]["style_dim"]
    # The spread comes from the training patches: not the standard normal's.
    assert not np.allclose(fitted.appearance.covariance, np.eye(2))
    bare_folder = _train(phantom_brats, tmp_path / "bare", dict(short, appearance_patches=0), tmp_path)
    bare = resolve_model(bare_folder)
    assert bare.appearance is None and "appearance" not in bare.config

    out = tmp_path / "refitted"
    capsys.readouterr()
    argv = ["appearance", str(bare_folder), "--data", str(phantom_brats), "-o", str(out), "--patches", "6",
            "--cache", str(training_cache_of(phantom_brats))]
    assert main(argv + ["--command-line", "medsynth " + " ".join(argv)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"{out}: bare with the appearance prior of 6 ")
    refitted = resolve_model(out)
    assert refitted.sha256 == bare.sha256 and refitted.appearance is not None
    # Same weights as `fitted` (same seed and steps), same patches: the prior export fitted.
    assert refitted.sha256 == fitted.sha256
    np.testing.assert_allclose(refitted.appearance.mean, fitted.appearance.mean, atol=1e-5)
    np.testing.assert_allclose(refitted.appearance.covariance, fitted.appearance.covariance, atol=1e-5)
    assert refitted.config["training"]["commands"][-1].startswith("medsynth appearance")
    assert not (bare_folder.parent / "refitted").exists() and "appearance" not in json.loads(
        (bare_folder / "config.json").read_text())  # the input model is left as it was

    # Refusals: one line, exit 2, nothing written.
    partial = tmp_path / "partial"
    shutil.copytree(phantom_brats / "BraTS2021_00000", partial / "BraTS2021_00000")
    plain = _model(tmp_path / "plain", PLAIN)
    cases = [
        (["appearance", str(bare_folder), "--data", str(partial), "-o", str(tmp_path / "x")],
         f"{partial}: 1 of the model's 2 training cases are not here (content sha256 "),
        (["appearance", str(plain), "--data", str(phantom_brats), "-o", str(tmp_path / "x")],
         f"{plain}: model plain has no appearance code (style_dim 0): its seed draws nothing"),
        (["appearance", str(bare_folder), "--data", str(phantom_brats), "-o", str(out)],
         f"{out}: output already exists (use --overwrite to replace it)"),
        (["appearance", str(bare_folder), "--data", str(tmp_path / "fitted"), "-o", str(tmp_path / "x")],
         f"{tmp_path / 'fitted'}: no case folders found"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x").exists()


def test_medsynth_appearance_finds_training_cases_recorded_under_the_older_key_scheme(phantom_brats, tmp_path,
                                                                                     capsys) -> None:
    """medsynth-spade27-cpu records its cases' hashes as computed before the cache version became 2: given the very
    folders it was trained on, ``appearance`` said '27 of the model's 27 training cases are not here'.  A record
    under the older scheme finds its cases, in its own order, and fits the prior the current record fits."""
    from MedSynthLib.training.data import case_key
    from test_evaluate import _key_written_before_cache_version_2

    short = dict(CONFIG, steps=2, val_every=2, checkpoint_every=2, appearance_patches=0)
    bare_folder = _train(phantom_brats, tmp_path / "bare", short, tmp_path)
    config = json.loads((bare_folder / "config.json").read_text())
    older_key = {case_key(folder): _key_written_before_cache_version_2(folder) for folder in phantom_brats.iterdir()}
    current = config["training"]["data"]["case_sha256"]
    assert set(current) <= set(older_key) and not set(older_key.values()) & set(current)
    config["training"]["data"]["case_sha256"] = [older_key[key] for key in current]  # the record's order kept
    older = tmp_path / "older"
    shutil.copytree(bare_folder, older)
    rewrite_model_config(older, {k: v for k, v in config.items() if k != "config_sha256"})

    fits = {}
    for name, model in (("current", bare_folder), ("older", older)):
        argv = ["appearance", str(model), "--data", str(phantom_brats), "-o", str(tmp_path / f"fit_{name}"),
                "--patches", "6", "--cache", str(training_cache_of(phantom_brats))]
        capsys.readouterr()
        assert main(argv) == 0, capsys.readouterr().err
        fits[name] = resolve_model(tmp_path / f"fit_{name}").appearance
    np.testing.assert_allclose(fits["older"].mean, fits["current"].mean, atol=1e-6)
    np.testing.assert_allclose(fits["older"].covariance, fits["current"].covariance, atol=1e-6)
    # The record's own hashes are kept: the fitted copy still tells its cases under the older scheme.
    assert resolve_model(tmp_path / "fit_older").config["training"]["data"]["case_sha256"] == \
        config["training"]["data"]["case_sha256"]
