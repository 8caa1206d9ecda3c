"""Training the SPADE generator kind: end to end, exact resume, the appearance code's KL, fine-tune checks.

Three small phantom cases, a tiny SPADE network (widths 4-8-8, code of 2), 16^3 patches, one thread.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import PHANTOM_BRATS_IDS, REPO, training_cache_of
from MedSynthLib.cli import main
from MedSynthLib.schema.errors import InputError
from MedSynthLib.synthesis.models import load_generator, resolve_model
from MedSynthLib.training.train import TrainConfig

CASE_IDS = PHANTOM_BRATS_IDS
SPADE_NETWORK = {"kind": "spade", "channels": [4, 8, 8], "strides": [2, 2], "bottleneck_blocks": 1,
                 "spade_hidden": 4, "style_dim": 2, "disc_channels": 4, "disc_layers": 1}
CONFIG = {"network": SPADE_NETWORK, "patch_size": 16, "steps": 6, "checkpoint_every": 2, "val_every": 6,
          "log_every": 1, "threads": 1, "val_cases": [CASE_IDS[2]], "precision": "fp32",
          "normalization": "healthy_zscore", "lr_decay_fraction": 0.0}


pytestmark = pytest.mark.usefixtures("torch_threads")  # training in this process sets torch's thread count


@pytest.fixture(scope="module")
def phantom_cases(phantom_brats) -> Path:
    return phantom_brats


def _train(data: Path, run: Path, config: Path, *extra: str) -> None:
    """``medsynth train`` through ``main()`` in this process, on the session's shared case cache."""
    args = ["train", "--data", str(data), "-o", str(run), "--config", str(config), "--device", "cpu",
            "--cache", str(training_cache_of(data)), *extra]
    assert main(args + ["--command-line", "medsynth " + " ".join(args)]) == 0


def test_spade_trains_resumes_exactly_and_synthesises(phantom_cases: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    config = tmp_path / "spade.json"
    config.write_text(json.dumps(CONFIG))
    _train(phantom_cases, tmp_path / "A", config)
    # B: stopped after 4 steps (a shorter planned length; the learning rate is constant), then resumed to 6.
    _train(phantom_cases, tmp_path / "B", config, "--steps", "4")
    _train(phantom_cases, tmp_path / "B", config, "--resume", "--steps", "6")
    a = load_file(str(tmp_path / "A" / "model" / "weights.safetensors"))
    b = load_file(str(tmp_path / "B" / "model" / "weights.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("net.style_encoder.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)

    model = resolve_model(tmp_path / "A" / "model")
    assert model.config["network"]["kind"] == "spade" and model.config["network"]["style_dim"] == 2
    assert model.config["intensity"]["t1"]["kind"] == "healthy_zscore"
    scalars = (tmp_path / "A" / "tensorboard").rglob("events.out.tfevents.*")
    assert any(b"loss/style_kl" in path.read_bytes() for path in scalars)
    # The exported weights load strictly into the MONAI-free inference network.
    generator = load_generator(model, "cpu", backend="torch")
    assert type(generator.net).__name__ == "InferenceSpadeGenerator"


def test_spade_config_checks() -> None:
    with pytest.raises(InputError, match="strides"):
        TrainConfig.from_json({"network": dict(SPADE_NETWORK, strides=[2, 1])})
    with pytest.raises(InputError, match="not a multiple of 4"):
        TrainConfig.from_json({"network": SPADE_NETWORK, "patch_size": 18})
    config = TrainConfig.from_json(CONFIG)
    assert config.network.has_style and config.style_kl_weight == 0.5


def test_the_floor_hinge_can_hold_wide_appearance_codes(phantom_cases: Path, tmp_path: Path, monkeypatch) -> None:
    """With floor_code_spread, each step renders the patch a second time with a wide code drawn from (seed, step,
    rank) and the floor hinge counts on that rendering too."""
    import MedSynthLib.training.train as train_module
    from MedSynthLib.synthesis.networks import Generator

    hinged: list[torch.Tensor] = []
    original = train_module.below_floor
    monkeypatch.setattr(train_module, "below_floor",
                        lambda prediction, floor, counted: hinged.append(prediction.detach().clone())
                        or original(prediction, floor, counted))
    extra: list[torch.Tensor] = []
    forward = Generator.forward
    monkeypatch.setattr(Generator, "forward", lambda self, *args, **kwargs: extra.append(kwargs.get("extra_styles"))
                        or forward(self, *args, **kwargs))
    config = tmp_path / "wide.json"
    config.write_text(json.dumps(dict(CONFIG, steps=2, checkpoint_every=2, val_every=1000, lambda_floor=100.0,
                                      floor_code_spread=2.0, appearance_patches=0)))
    _train(phantom_cases, tmp_path / "run", config)
    codes = [code for code in extra if code is not None]
    assert len(codes) == 2 and codes[0].shape == (1, 2) and not torch.equal(codes[0], codes[1])
    assert len(hinged) == 4  # per step: the encoded code's rendering, then the wide code's
    assert not torch.equal(hinged[0], hinged[1]) and hinged[0].shape == hinged[1].shape
    events = b"".join(p.read_bytes() for p in (tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    assert b"loss/below_floor_wide_codes" in events


def test_the_wide_codes_renderings_can_face_the_discriminator(phantom_cases: Path, tmp_path: Path, monkeypatch) -> None:
    """With adversarial_wide_codes, the discriminator judges the wide code's rendering as generated (a third pair
    in its batch) and the generator gets an adversarial term on it."""
    import MedSynthLib.training.train as train_module

    batches: list[int] = []
    build = train_module.build_discriminator

    def recording_build(config):
        discriminator = build(config)
        discriminator.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
        return discriminator

    monkeypatch.setattr(train_module, "build_discriminator", recording_build)
    config = tmp_path / "wide_adv.json"
    config.write_text(json.dumps(dict(CONFIG, steps=2, checkpoint_every=2, val_every=1000, lambda_floor=100.0,
                                      floor_code_spread=2.0, adversarial_wide_codes=True, appearance_patches=0)))
    _train(phantom_cases, tmp_path / "run", config)
    # Per step: the discriminator's own pass (real, encoded code's, wide code's), then the generator's two.
    assert batches == [3, 1, 1] * 2
    events = b"".join(p.read_bytes() for p in (tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    assert b"loss/generator_adversarial_wide_codes" in events and b"loss/below_floor_wide_codes" in events


def test_extra_codes_render_the_same_label_map_in_the_same_pass() -> None:
    from MedSynthLib.synthesis.networks import Generator, NetworkConfig

    torch.manual_seed(0)
    generator = Generator(NetworkConfig.from_json(dict(SPADE_NETWORK, in_channels=7, out_channels=4))).eval()
    onehot = torch.nn.functional.one_hot(torch.randint(0, 7, (1, 16, 16, 16)), 7).permute(0, 4, 1, 2, 3).float()
    real = torch.randn((1, 4, 16, 16, 16))
    wide = torch.tensor([[3.0, -2.5]])
    with torch.no_grad():
        both, kl = generator(onehot, reference=real, noise=torch.zeros((1, 2)), extra_styles=wide)
        encoded, kl_alone = generator(onehot, reference=real, noise=torch.zeros((1, 2)))
        alone = generator(onehot, style=wide)
    assert both.shape == (2, 4, 16, 16, 16) and torch.equal(kl, kl_alone)
    assert torch.allclose(both[:1], encoded, atol=1e-6) and torch.allclose(both[1:], alone, atol=1e-6)
    assert not torch.allclose(both[:1], both[1:], atol=1e-3)


@pytest.mark.parametrize("options, message", [
    ({"floor_code_spread": 1.5}, "needs lambda_floor above 0"),
    ({"floor_code_spread": 1.5, "lambda_floor": 10.0, "network": dict(SPADE_NETWORK, style_dim=0)},
     "a network with an appearance code"),
    ({"floor_code_spread": -1.0, "lambda_floor": 10.0}, "floor_code_spread"),
    ({"adversarial_wide_codes": True}, "needs floor_code_spread above 0 and an adversarial term"),
    ({"adversarial_wide_codes": True, "floor_code_spread": 1.5, "lambda_floor": 10.0, "adversarial": "none"},
     "needs floor_code_spread above 0 and an adversarial term"),
    ({"lambda_wide_contrast": 10.0}, "needs floor_code_spread above 0"),
    ({"lambda_wide_contrast": 10.0, "floor_code_spread": 1.5, "lambda_floor": 10.0, "wide_contrast_keep": 1.5},
     "wide_contrast_keep"),
])
def test_floor_code_spread_checks(options: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        TrainConfig.from_json(dict(CONFIG, **options), "cfg.json")


def test_shipped_spade_configs_load() -> None:
    for path in sorted((REPO / "Resources" / "configs").glob("*spade*.json")):
        config = TrainConfig.from_json(json.loads(path.read_text()), str(path))
        assert config.network.kind == "spade", path


def test_cross_validation_folds() -> None:
    folds = [["a", "b"], ["c"], ["d", "e"]]
    config = TrainConfig.from_json({"cv_folds": folds, "cv_fold": 2})
    assert config.val_cases == ["d", "e"]
    with pytest.raises(InputError, match="cv_fold 3"):
        TrainConfig.from_json({"cv_folds": folds, "cv_fold": 3})
    with pytest.raises(InputError, match="exactly one fold"):
        TrainConfig.from_json({"cv_folds": [["a", "b"], ["b"]], "cv_fold": 0})
    with pytest.raises(InputError, match="disagree"):
        TrainConfig.from_json({"cv_folds": folds, "cv_fold": 0, "val_cases": ["c"]})


def test_retraining_folds_keep_every_real_case_once(real_data: Path) -> None:
    """The 3-fold config covers the 27 real cases, each once; the three patients that brats2020_seg also
    holds (CBICA_ABM, _ALU, _AME) share one fold."""
    config = json.loads((REPO / "Resources" / "configs" / "spade_brats27_cv.json").read_text())
    names = sorted(p.name for root in ("brats2021/cases", "brats_more/cases") for p in (real_data / root).iterdir()
                   if p.is_dir())
    folds = config["cv_folds"]
    assert sorted(n for fold in folds for n in fold) == names and len(names) == 27
    shared = {"Brats18_CBICA_ABM_1", "Brats18_CBICA_ALU_1", "Brats18_CBICA_AME_1"}
    assert sum(bool(shared & set(fold)) for fold in folds) == 1


def test_train_on_several_data_folders_with_a_fold(phantom_cases: Path, tmp_path: Path) -> None:
    import shutil

    first, second = tmp_path / "site1", tmp_path / "site2"
    shutil.copytree(phantom_cases / CASE_IDS[0], first / CASE_IDS[0])
    for case_id in CASE_IDS[1:]:
        shutil.copytree(phantom_cases / case_id, second / case_id)
    config = dict(CONFIG, steps=2, checkpoint_every=2, val_every=2, val_cases=[],
                  cv_folds=[[CASE_IDS[0]], [CASE_IDS[1], CASE_IDS[2]]])
    path = tmp_path / "cv.json"
    path.write_text(json.dumps(config))
    args = ["train", "--data", str(first), str(second), "-o", str(tmp_path / "run"), "--config", str(path),
            "--device", "cpu", "--fold", "0", "--cache", str(training_cache_of(phantom_cases))]
    assert main(args + ["--command-line", "medsynth " + " ".join(args)]) == 0
    recorded = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert recorded["config"]["val_cases"] == [CASE_IDS[0]] and recorded["config"]["cv_fold"] == 0
    model = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert model["training"]["data"]["cases"] == 2


def test_the_contrast_order_loss_holds_a_share_of_the_real_contrast() -> None:
    """Zero while the rendering keeps at least ``keep`` of each real class difference; the shortfall otherwise;
    pairs the real patch itself inverts, and classes too small to measure, do not count."""
    from MedSynthLib.evaluation.image_checks import CONTRAST_RULES
    from MedSynthLib.schema.labels import Label
    from MedSynthLib.training.losses import contrast_order_loss, contrast_pairs

    modalities = ("t1", "t1ce", "t2", "flair")
    pairs = contrast_pairs(modalities)
    assert (0, int(Label.GM), int(Label.WM)) in pairs and (3, int(Label.CSF), int(Label.ED)) in pairs
    assert len(pairs) >= len(CONTRAST_RULES)
    labels = torch.zeros((1, 8, 8, 8), dtype=torch.long)
    labels[:, :4] = int(Label.GM)
    labels[:, 4:] = int(Label.WM)
    classes = torch.nn.functional.one_hot(labels, 7).permute(0, 4, 1, 2, 3).float()
    real = torch.zeros((1, 4, 8, 8, 8))
    real[:, 0, 4:] = 1.0  # T1: white matter 1 above grey matter, as real
    real[:, 2, :4] = 1.0  # T2: grey matter above white matter: no rule pair asks for more
    only_t1 = ((0, int(Label.GM), int(Label.WM)),)
    assert float(contrast_order_loss(real, real, classes, pairs)) == 0.0
    flat = real.clone()
    flat[:, 0, 4:] = 0.3  # a washed-out T1: 0.3 of the real contrast, 0.5 kept
    assert float(contrast_order_loss(flat, real, classes, only_t1, keep=0.5)) == pytest.approx(0.2)
    assert float(contrast_order_loss(flat, real, classes, only_t1, keep=0.0)) == 0.0
    inverted = real.clone()
    inverted[:, 0, 4:] = -1.0
    loss = contrast_order_loss(inverted.requires_grad_(), real, classes, only_t1, keep=0.5)
    assert float(loss.detach()) == pytest.approx(1.5)
    loss.backward()
    assert float(inverted.grad[0, 0, 4:].sum()) < 0 < float(inverted.grad[0, 0, :4].sum())  # lifts WM, lowers GM
    swapped = real.clone()
    swapped[:, 0] = 1.0 - real[:, 0]  # the real patch itself inverts the pair: nothing to hold
    assert float(contrast_order_loss(real, swapped, classes, only_t1)) == 0.0
    assert float(contrast_order_loss(inverted.detach(), real, classes, only_t1, min_voxels=257)) == 0.0


def test_the_wide_codes_renderings_can_keep_the_contrast_rules(phantom_cases: Path, tmp_path: Path,
                                                               monkeypatch) -> None:
    """With lambda_wide_contrast, the contrast-order hinge is applied to the wide code's rendering each step."""
    import MedSynthLib.training.train as train_module

    seen: list[torch.Tensor] = []
    original = train_module.contrast_order_loss
    monkeypatch.setattr(train_module, "contrast_order_loss",
                        lambda prediction, *args: seen.append(prediction.detach().clone()) or original(prediction, *args))
    config = tmp_path / "wide_contrast.json"
    config.write_text(json.dumps(dict(CONFIG, steps=2, checkpoint_every=2, val_every=1000, lambda_floor=100.0,
                                      floor_code_spread=2.0, lambda_wide_contrast=10.0, appearance_patches=0)))
    _train(phantom_cases, tmp_path / "run", config)
    assert len(seen) == 2 and seen[0].shape[0] == 1
    events = b"".join(p.read_bytes() for p in (tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*"))
    assert b"loss/wide_codes_contrast" in events
