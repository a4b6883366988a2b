import json

import pytest
import torch

from uvclab import paths
from uvclab.engine.data import load_dataset
from uvclab.errors import UvclabError
from uvclab.engine.config import TeacherConfig, parse_overrides
from uvclab.engine.loop import evaluate, warmup_cosine
from uvclab.engine.teacher import cli_command, load_teacher, train_teacher
from uvclab.ui.cli import teacher_cli

TINY = {"img_size": 8, "patch_size": 4, "in_chans": 1, "embed_dim": 24, "depth": 1, "num_heads": 2}


def tiny(**kw) -> TeacherConfig:
    return TeacherConfig(**{"model": "deit_tiny_patch16_224", "model_kwargs": TINY, "dataset": "digits", **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "tiny"
    card = train_teacher(tiny(epochs=1, batch_size=128, lr=1e-3, seed=0, warmup_epochs=0), out, progress=False,
                         log=lambda line: None)
    return out, card


def test_training_writes_weights_and_card(trained):
    out, card = trained
    on_disk = json.loads(out.with_name("tiny.json").read_text())
    assert on_disk == card
    assert out.with_name("tiny.safetensors").is_file() and card["weights"] == "tiny.safetensors"
    assert card["model"] == {"name": "deit_tiny_patch16_224", "kwargs": {**TINY, "num_classes": 10}}
    assert card["dataset"] == "digits" and card["split_seed"] == 0 and card["epochs"] == 1
    assert 0 <= card["test_top1"] <= 100 and 0 <= card["val_top1"] <= 100
    assert card["command"].startswith("uvclab teacher --model deit_tiny_patch16_224 --dataset digits")
    assert card["versions"]["uvclab"] and card["train_time_s"] > 0 and card["weights_dtype"] == "float32"


def test_reloaded_teacher_gives_identical_outputs(trained):
    out, card = trained
    splits = load_dataset("digits", augment=False)
    x = torch.stack([splits.test[i][0] for i in range(16)])
    by_card, by_weights, by_stem = (load_teacher(out.with_name("tiny.json")),
                                    load_teacher(out.with_name("tiny.safetensors")), load_teacher(out))
    assert not by_card.training
    torch.testing.assert_close(by_card(x), by_weights(x), rtol=0, atol=0)
    torch.testing.assert_close(by_card(x), by_stem(x), rtol=0, atol=0)
    assert evaluate(by_card, splits.test) == pytest.approx(card["test_top1"])


def test_card_detects_foreign_weights(trained, tmp_path):
    out, card = trained
    (tmp_path / "t.json").write_text(json.dumps(card))
    (tmp_path / "tiny.safetensors").write_bytes(out.with_name("tiny.safetensors").read_bytes() + b" ")
    with pytest.raises(UvclabError, match="different runs"):
        load_teacher(tmp_path / "t.json")


def test_fp16_weights_load_back_as_fp32(tmp_path):
    card = train_teacher(tiny(epochs=1, batch_size=256, seed=1, max_steps_per_epoch=1, fp16=True), tmp_path / "half",
                         progress=False, log=lambda line: None)
    model = load_teacher(tmp_path / "half.json")
    assert card["weights_dtype"] == "float16"
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_committed_digits_teacher_reproduces_its_card():
    card_path = paths.default_teacher("digits")
    if not card_path.is_file():
        pytest.skip("data/teachers/digits_vit.json not trained yet")
    card = json.loads(card_path.read_text())
    model = load_teacher(card_path)  # also checks the weights' sha256 against the card
    splits = load_dataset(card["dataset"], split_seed=card["split_seed"])
    assert card["test_top1"] >= 95.0
    # one test image of slack for CPU kernel differences
    assert abs(evaluate(model, splits.test) - card["test_top1"]) <= 100 / len(splits.test) + 1e-9
    assert card_path.with_name(card["weights"]).stat().st_size < 10 * 2 ** 20


def test_warmup_cosine_schedule():
    f = warmup_cosine(total_steps=100, warmup_steps=10, min_ratio=0.0)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


def test_cli_helpers_and_errors(tmp_path):
    assert parse_overrides(["embed_dim=96", "name=abc", "flag=true", "uvc.glr=0.5"]) == {
        "embed_dim": 96, "name": "abc", "flag": True, "uvc": {"glr": 0.5}}
    with pytest.raises(UvclabError, match="key=value"):
        parse_overrides(["embed_dim"])
    cfg = TeacherConfig(model="m", dataset="digits", epochs=2, model_kwargs={"depth": 2}, augment=False)
    assert cli_command(cfg, "out") == "uvclab teacher --model m --dataset digits --set epochs=2 " \
                                      "--set augment=false --set depth=2 --out out"
    with pytest.raises(UvclabError, match="does not exist"):
        load_teacher(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UvclabError, match="not a uvclab teacher card"):
        load_teacher(tmp_path / "bad.json")


def test_teacher_cli_runs(tmp_path, capsys):
    threads = torch.get_num_threads()
    model_args = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    try:
        card = teacher_cli(["--dataset", "digits", "--epochs", "1", "--max-steps-per-epoch", "1", "--threads", "1",
                            "--no-progress", "--out", str(tmp_path / "cli"), *model_args])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "cli.json").is_file() and card["command"].startswith("uvclab teacher --dataset digits")
    assert "wrote" in capsys.readouterr().out


def test_init_continues_from_a_teacher_and_never_returns_a_worse_one(trained, tmp_path):
    start, card0 = trained
    card = train_teacher(tiny(epochs=1, batch_size=128, lr=1e-9, seed=1, warmup_epochs=0, init=str(start) + ".json"),
                         tmp_path / "cont", progress=False, log=lambda line: None)
    assert card["parents"][-1]["weights_sha256"] == card0["weights_sha256"]
    assert card["val_top1"] >= card0["val_top1"]              # the start point competes for the best epoch
    assert card["recipe"]["init"].endswith("tiny.json") and "init=" in card["command"]
    with pytest.raises(UvclabError, match="does not match"):
        train_teacher(tiny(epochs=1, model_kwargs=dict(TINY, embed_dim=32), init=str(start) + ".json"), tmp_path / "x",
                      progress=False, log=lambda line: None)


def test_teacher_config_from_yaml_and_set(tmp_path):
    from uvclab.engine.config import load_teacher_config
    (tmp_path / "t.yaml").write_text("dataset: digits\nepochs: 3\nmodel_kwargs: {depth: 2}\n")
    cfg = load_teacher_config(tmp_path / "t.yaml", ["embed_dim=48", "lr=3e-4", "model_kwargs.num_heads=3"])
    assert cfg.epochs == 3 and cfg.lr == 3e-4 and cfg.model_kwargs == {"depth": 2, "embed_dim": 48, "num_heads": 3}
    cfg.save(tmp_path / "out.yaml")
    assert load_teacher_config(tmp_path / "out.yaml") == cfg                  # YAML in, YAML out
    with pytest.raises(UvclabError, match="must be a number"):
        load_teacher_config(None, ["lr=fast"])
