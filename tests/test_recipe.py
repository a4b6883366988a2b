"""timm's training recipe and mixed precision (issue 27): exact losses, RNG / EMA / scaler round trips, config keys."""
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from uvclab.engine.config import CompressConfig, load_config
from uvclab.engine.data import load_dataset
from uvclab.engine.distill import distillation_loss
from uvclab.engine.precision import TrainStep, autocast
from uvclab.engine.recipe import RecipeSettings, build_recipe, with_train_transform
from uvclab.errors import UvclabError

W_S = torch.tensor([[1.0, -0.5, 0.2], [0.0, 0.3, -1.0], [0.4, 0.4, 0.4]])  # student: logits = x @ W_S.T (K=3, D=3)
W_T = torch.tensor([[0.5, 0.5, -0.2], [-1.0, 0.2, 0.0], [0.1, -0.3, 0.9]])  # teacher
X = torch.tensor([[1.0, 2.0, -1.0], [0.5, -0.5, 2.0]])  # (B=2, D=3)
Y = torch.tensor([0, 2])


def _log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def _matvec(w, x):
    return [sum(a * b for a, b in zip(wr, x)) for wr in w.tolist()]


def test_mixup_kd_loss_equals_hand_computation():
    """(1 - a) * SoftTargetCE(student(mix x), mixed targets) + a * KL(teacher(mix x) || student(mix x)), teacher
    on the same mixed batch (DeiT pattern), against plain Python."""
    alpha, smoothing, K = 0.3, 0.1, 3
    rec = build_recipe(RecipeSettings(mixup=0.8, smoothing=smoothing), num_classes=K)
    seen = {}

    def teacher(x):
        seen["x"] = x.clone()
        return x @ W_T.T

    loss_fn = rec.wrap_loss(lambda x, y: distillation_loss(x @ W_S.T, y, teacher(x), kind="soft", alpha=alpha,
                                                           criterion=rec.criterion))
    np.random.seed(0)
    got = loss_fn(X.clone(), Y).item()
    np.random.seed(0)  # timm Mixup (mode batch, prob 1): a rand() for the prob check, then lam ~ Beta(0.8, 0.8)
    np.random.rand()
    lam = float(np.random.beta(0.8, 0.8))
    xs = X.tolist()
    mixed = [[lam * a + (1 - lam) * b for a, b in zip(xs[i], xs[1 - i])] for i in range(2)]
    off, on = smoothing / K, 1 - smoothing + smoothing / K
    onehot = [[on if k == y else off for k in range(K)] for y in Y.tolist()]
    targets = [[lam * a + (1 - lam) * b for a, b in zip(onehot[i], onehot[1 - i])] for i in range(2)]
    ce = kl = 0.0
    for i in range(2):
        ls, lt = _log_softmax(_matvec(W_S, mixed[i])), _log_softmax(_matvec(W_T, mixed[i]))
        ce += -sum(t * l for t, l in zip(targets[i], ls)) / 2
        kl += sum(math.exp(b) * (b - a) for a, b in zip(ls, lt)) / 2  # batchmean, tau 1
    assert got == pytest.approx((1 - alpha) * ce + alpha * kl, rel=1e-6)
    assert torch.allclose(seen["x"], torch.tensor(mixed), atol=1e-6)  # the teacher saw the mixed batch


def test_smoothing_only_uses_timm_label_smoothing():
    rec = build_recipe(RecipeSettings(smoothing=0.1), num_classes=3)
    logits = X @ W_S.T
    assert rec.mixup is None and type(rec.criterion).__name__ == "LabelSmoothingCrossEntropy"
    assert distillation_loss(logits, Y, kind="none", criterion=rec.criterion).item() == pytest.approx(
        F.cross_entropy(logits, Y, label_smoothing=0.1).item(), rel=1e-6)


def test_recipe_off_is_the_plain_loss():
    rec = build_recipe(RecipeSettings(), num_classes=3, model=torch.nn.Linear(3, 3))
    f = lambda x, y: distillation_loss(x @ W_S.T, y, x @ W_T.T, criterion=rec.criterion)  # noqa: E731
    assert rec.mixup is None and rec.criterion is None and rec.ema is None and rec.wrap_loss(f) is f
    assert torch.equal(f(X, Y), distillation_loss(X @ W_S.T, Y, X @ W_T.T))


def _round_trip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # what runfiles.load_checkpoint does


def test_state_round_trip_reproduces_next_mixed_batch_and_ema():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    s = RecipeSettings(mixup=0.8, cutmix=1.0, mixup_prob=0.8, smoothing=0.1, model_ema_decay=0.9)
    rec = build_recipe(s, 3, model)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])

    def step(r):
        mx, my = r.mixup(x.clone(), y)
        with torch.no_grad():
            model.weight.add_(0.1)
        r.after_step(model)
        return mx, my, {k: v.clone() for k, v in r.ema.module.state_dict().items()}

    np.random.seed(1)
    for _ in range(3):
        step(rec)
    saved, w = _round_trip(rec.state_dict()), model.weight.detach().clone()
    first = [step(rec) for _ in range(3)]
    np.random.seed(99)  # a different process state; the checkpoint restores it
    rec2 = build_recipe(s, 3, torch.nn.Linear(4, 3))
    with torch.no_grad():
        model.weight.copy_(w)
    rec2.load_state_dict(saved)
    again = [step(rec2) for _ in range(3)]
    for (ax, ay, ae), (bx, by, be) in zip(first, again):
        assert torch.equal(ax, bx) and torch.equal(ay, by)
        assert all(torch.equal(ae[k], be[k]) for k in ae)


def test_grey_datasets_refuse_randaugment_and_take_erasing():
    splits = load_dataset("digits")
    with pytest.raises(UvclabError, match="RGB"):
        with_train_transform(splits, RecipeSettings(aa="rand-m9-mstd0.5-inc1"))
    assert with_train_transform(splits, RecipeSettings()) is splits
    erased = with_train_transform(splits, RecipeSettings(reprob=1.0)).train
    x0, y0 = splits.train[0]
    x1, y1 = erased[0]
    assert y0 == y1 and x1.shape == x0.shape and not torch.equal(x0, x1) and torch.equal(splits.train[0][0], x0)


def test_imagefolder_gets_timm_transform(tmp_path):
    from benchmarks.gpu_check import write_imagefolder
    root = write_imagefolder(tmp_path / "data", classes=2, per_class=6, size=40)
    splits = load_dataset("imagefolder", root=root, img_size=32)
    s = RecipeSettings(aa="rand-m9-mstd0.5-inc1", reprob=0.25)
    out = with_train_transform(splits, s)
    names = [type(t).__name__ for t in out.train.dataset.transform.transforms]
    assert "RandAugment" in names and "RandomErasing" in names and out.train[0][0].shape == (3, 32, 32)
    assert out.val is splits.val and "RandAugment" not in str(splits.train.dataset.transform)


def test_config_flat_keys_and_finetune_override():
    cfg = load_config(overrides=["mixup=0.8", "smoothing=0.1", "recipe.finetune.aa=rand-m9-mstd0.5-inc1",
                                 "amp=bf16"])
    assert cfg.recipe.mixup == 0.8 and cfg.recipe.aa is None
    ft = cfg.recipe.for_finetune()
    assert ft.aa == "rand-m9-mstd0.5-inc1" and ft.smoothing == 0.1 and cfg.run.amp == "bf16"
    assert CompressConfig.from_dict(cfg.to_dict()) == cfg
    assert load_config().recipe == RecipeSettings() and load_config().recipe.for_finetune() == RecipeSettings()
    with pytest.raises(UvclabError, match="amp"):
        load_config(overrides=["amp=fp8"])
    with pytest.raises(UvclabError, match="probability"):
        load_config(overrides=["reprob=2"])


def _train(step_fn, steps=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    f = lambda a, b: F.cross_entropy(model(a), b)  # noqa: E731
    for _ in range(steps):
        step_fn.update(step_fn.loss(f, x, y), model, opt, 1.0)
    return model, opt


def test_default_step_is_the_float32_step():
    model, _ = _train(TrainStep())
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for _ in range(3):
        loss = F.cross_entropy(ref(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))


def test_bf16_autocast_and_fp16_scaler_state():
    with autocast("bf16", "cpu"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    model, _ = _train(TrainStep("bf16"))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    step = TrainStep("fp16")
    _train(step)
    state = _round_trip(step.state_dict())
    other = TrainStep("fp16")
    other.load_state_dict(state)
    assert other.scaler.get_scale() == step.scaler.get_scale() and TrainStep().state_dict() == {}


RECIPE_RUN = ["warmup_epochs=1", "search_epochs=2", "finetune_epochs=2", "max_steps_per_epoch=4", "progress=false",
              "uvc.gating_interval=5", "mixup=0.8", "cutmix=1.0", "smoothing=0.1", "model_ema_decay=0.9", "amp=bf16"]


@pytest.fixture(scope="module")
def recipe_ref(tmp_path_factory):
    from uvclab.engine.compress import compress
    out = tmp_path_factory.mktemp("recipe") / "ref"
    return out, compress(load_config(overrides=RECIPE_RUN), out)


def test_recipe_run_records_the_recipe_and_stays_finite(recipe_ref):
    import json
    out, report = recipe_ref
    assert report["recipe"]["mixup"] == 0.8 and report["amp"] == "bf16" and report["recipe"]["model_ema_decay"] == 0.9
    assert "mixup: 0.8" in (out / "config.yaml").read_text()
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("crash_at", [2, 4])  # 2: mid-search (Mixup RNG); 4: mid-fine-tune (EMA weights too)
def test_resume_with_mixup_and_ema_equals_uninterrupted(recipe_ref, tmp_path, monkeypatch, crash_at):
    import uvclab
    from uvclab.engine import checkpointing, compress as train
    ref_out, ref = recipe_ref
    real, calls = checkpointing.save_checkpoint, {"n": 0}

    def crash(path, state):
        real(path, state)
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpointing, "save_checkpoint", crash)
    cfg = load_config(overrides=RECIPE_RUN)
    with pytest.raises(KeyboardInterrupt):
        train.compress(cfg, tmp_path / "run")
    monkeypatch.setattr(checkpointing, "save_checkpoint", real)
    np.random.seed(12345)  # a fresh process would not hold the interrupted run's numpy state
    resumed = train.compress(cfg, tmp_path / "run", resume=True)
    assert resumed["top1"] == ref["top1"] and resumed["val_top1"] == ref["val_top1"] and resumed["macs"] == ref["macs"]
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(uvclab.load_pruned(tmp_path / "run/model")(x), uvclab.load_pruned(ref_out / "model")(x))


@pytest.mark.slow
def test_default_job_under_bf16_stays_finite_and_on_budget(tmp_path):
    """The embedded default job (digits, B = 0.5) with amp=bf16: every loss finite, the export within 0.02 of B."""
    import json
    from uvclab.engine.compress import compress
    report = compress(load_config(overrides=["amp=bf16", "progress=false"]), tmp_path / "run")
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "run/metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert losses and all(math.isfinite(v) for v in losses)
    assert report["budget"] - 0.02 <= report["macs_ratio"] <= report["budget"]
