"""The Performer tokens-to-token stem (official t2t_vit_7..24) beyond what test_t2t_vit.py checks for both stems:
its fixed random projection, dropout and precision, the search / export / CLI pipeline on it, and run folders
and cards from before it existed (when t2t_vit_N meant the Transformer stem)."""
import json
import math

import pytest
import torch
from torch import nn

import uvclab
from uvclab.compare.runs import read_runs
from uvclab.engine.config import load_config
from uvclab.engine.loop import adamw_with_schedule
from uvclab.engine.runfiles import save_checkpoint
from uvclab.engine.teacher import load_teacher, save_teacher
from uvclab.errors import UvclabError
from uvclab.prune.baselines import uniform_structure
from uvclab.ui.cli import main
from uvclab.vit.export import export_model, load_pruned, save_pruned
from uvclab.vit.macs import flop_counter_macs
from uvclab.vit.t2t_tokens import TokenPerformer

from conftest import random_structure

# blocks dominate at 32x32 only with a narrow stem (token_dim 16): the stem and head are 0.14 of the MACs
KW = dict(img_size=32, in_chans=1, num_classes=10, depth=4, embed_dim=128, num_heads=4, token_dim=16)
QUICK = ["warmup_epochs=1", "search_epochs=2", "finetune_epochs=1", "max_steps_per_epoch=4", "progress=false",
         "uvc.gating_interval=5", "eval_max_samples=64", "test_max_samples=64"]


def small(seed=0, **kw):
    torch.manual_seed(seed)
    return uvclab.create_vit("t2t_vit_7", **{**KW, **kw}).eval()


def test_random_projection_is_the_official_draw_fixed_and_saved():
    torch.manual_seed(0)
    tp = TokenPerformer(147, 64)
    torch.manual_seed(0)  # the official constructor's draws, in its order: kqv, proj, mlp.0, mlp.2, then w
    kqv, _, _, _ = nn.Linear(147, 192), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
    w = nn.init.orthogonal_(torch.randn(32, 64)) * math.sqrt(32)
    assert torch.equal(tp.kqv.weight, kqv.weight) and torch.equal(tp.w, w)
    torch.testing.assert_close(tp.w @ tp.w.T, 32 * torch.eye(32), atol=1e-4, rtol=0)  # orthogonal rows, norm sqrt(m)
    assert not tp.w.requires_grad and "w" in tp.state_dict() and "w" not in dict(tp.named_buffers())
    # frozen in training: no gradient, and uvclab's AdamW (weight decay included) leaves it untouched
    m = small().train()
    w0, kqv0 = m.patch_embed.attention1.w.clone(), m.patch_embed.attention1.kqv.weight.clone()
    opt, _ = adamw_with_schedule(m, 1e-2, 0.05, 10, 1)
    for _ in range(2):
        opt.zero_grad()
        m(torch.randn(4, 1, 32, 32)).logsumexp(-1).mean().backward()
        opt.step()
    assert m.patch_embed.attention1.w.grad is None and torch.equal(m.patch_embed.attention1.w, w0)
    assert not torch.equal(m.patch_embed.attention1.kqv.weight, kqv0)


def test_dropout_is_the_official_and_only_in_training():
    m = small()
    pe = m.patch_embed.attention1
    assert pe.dp.p == 0.1 and pe.mlp[3].p == 0.1
    x = torch.randn(2, 1, 32, 32)
    torch.manual_seed(1)
    assert torch.equal(m(x), m(x))  # eval: deterministic
    m.train()
    assert not torch.equal(m(x), m(x))
    m0 = small(performer_drop_rate=0.0).train()
    assert torch.equal(m0(x), m0(x))


def test_random_features_in_float32_under_low_precision():
    m = small()
    x = torch.randn(2, 1, 32, 32)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert torch.isfinite(out).all() and (out.float() - ref).abs().max() < 0.1 * ref.abs().max()
    half = small().to(torch.bfloat16)
    out = half(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_budget_counts_the_stem_as_fixed_cost():
    m = small()
    dense = uvclab.count(m)["macs"]
    s = uniform_structure(m, 0.5)
    e = export_model(m, s)
    assert flop_counter_macs(e) == uvclab.count(m, s)["macs"] <= 0.5 * dense
    torch.testing.assert_close(e.patch_embed(torch.ones(1, 1, 32, 32)), m.patch_embed(torch.ones(1, 1, 32, 32)))
    fixed = m.patch_embed.macs() + m.head.in_features * m.head.out_features
    with pytest.raises(UvclabError, match="stem and head alone cost"):
        uniform_structure(m, 0.9 * fixed / dense)


def test_torch_pruning_structure_keeps_the_t2t_stem():
    from uvclab.prune.tp import torch_pruning_structure
    m = small()
    stem = {k: v.clone() for k, v in m.patch_embed.state_dict().items()}
    s = torch_pruning_structure(m, 0.6, [(torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,)))])
    e = export_model(m, s)
    assert flop_counter_macs(e) == uvclab.count(m, s)["macs"] <= 0.6 * uvclab.count(m)["macs"]
    assert all(torch.equal(v, e.patch_embed.state_dict()[k]) for k, v in stem.items())


@pytest.mark.slow
def test_compress_cli_on_the_performer_stem(tmp_path):
    """`uvclab compress --set model=t2t_vit_7`: UVC search, fit, export, fine-tune, save, on the Performer stem."""
    out = tmp_path / "run"
    args = ["compress", "--out", str(out), "--set", "model=t2t_vit_7", "--set", f"model_kwargs={json.dumps(KW)}",
            "--set", "teacher=null", "--set", "macs_ratio=0.6"]
    assert main(args + sum((["--set", s] for s in QUICK), [])) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"] == {"name": "t2t_vit_7", "kwargs": {**KW, "tokens_type": "performer"}}
    assert 0.58 <= report["macs_ratio"] <= 0.6
    slim = load_pruned(out / "model")
    assert slim.tokens_type == "performer" and flop_counter_macs(slim) == report["macs"]
    card = json.loads((out / "model" / "uvclab.json").read_text())
    assert card["model"]["kwargs"]["tokens_type"] == "performer"


# ---- run folders and cards from before the Performer stem -------------------------------------------------

def _drop_tokens_type(card: dict) -> dict:
    card["model"]["kwargs"].pop("tokens_type")
    return card


def test_old_export_and_teacher_cards_keep_the_transformer_stem(tmp_path):
    m = small(tokens_type="transformer")
    e = export_model(m, random_structure(m, 1))
    save_pruned(e, tmp_path / "exp")
    card = tmp_path / "exp" / "uvclab.json"
    card.write_text(json.dumps(_drop_tokens_type(json.loads(card.read_text()))))  # as written before
    old = load_pruned(tmp_path / "exp")
    x = torch.randn(2, 1, 32, 32)
    assert old.tokens_type == "transformer" and torch.equal(old(x), e(x))
    assert uvclab.count(old) == uvclab.count(m, random_structure(m, 1))
    save_teacher(m, tmp_path / "teacher", {"kind": "uvclab-teacher", "model": m.uvclab_config})
    tcard = tmp_path / "teacher.json"
    tcard.write_text(json.dumps(_drop_tokens_type(json.loads(tcard.read_text()))))
    t = load_teacher(tcard)
    assert t.tokens_type == "transformer" and torch.equal(t(x), m(x))
    assert t.uvclab_config["kwargs"]["tokens_type"] == "transformer"  # re-saved cards now say it
    # the runs table shows an old report's model with its stem
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "report.json").write_text(json.dumps(
        {"method": "uvc", "dataset": "digits", "budget": 0.5, "model": {"name": "t2t_vit_14", "kwargs": {}}}))
    assert json.loads(read_runs(tmp_path / "runs").model_kwargs[0]) == {"tokens_type": "transformer"}


def test_resuming_an_old_t2t_run_says_what_to_change(tmp_path):
    from uvclab.engine.compress import compress
    out = tmp_path / "old"
    cfg = load_config(overrides=QUICK + ["model=t2t_vit_7", f"model_kwargs={json.dumps(KW)}", "teacher=null"])
    out.mkdir()
    cfg.save(out / "config.yaml")  # an interrupted run of the old t2t_vit_7 (Transformer stem)
    save_checkpoint(out / "checkpoint.pt", {"stage": "search", "epoch": 1,
                                            "model": small(tokens_type="transformer").state_dict()})
    with pytest.raises(UvclabError, match="tokens_type: transformer.*--set model_kwargs.tokens_type=transformer"):
        compress(cfg, out, resume=True)
