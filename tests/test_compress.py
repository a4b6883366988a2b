"""End-to-end `uvclab compress` on the embedded digits data: outputs, budget, resume, NaN stop, DDP."""
import json
import os
import subprocess
import sys

import pytest
import torch

import uvclab
from uvclab.engine import compress as train
from uvclab.engine import checkpointing, distill, strategies as search_stage
from uvclab.engine.loop import evaluate
from uvclab.engine.runfiles import load_checkpoint
from uvclab.ui.cli import main
from uvclab.engine.config import load_config
from uvclab.errors import UvclabError
from uvclab.vit.structure import Structure

QUICK = ["warmup_epochs=1", "search_epochs=2", "finetune_epochs=2", "max_steps_per_epoch=6", "progress=false",
         "uvc.gating_interval=5"]


def quick_cfg(*extra):
    return load_config(overrides=QUICK + list(extra))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "digits"
    code = main(["compress", "--out", str(out)] + sum((["--set", s] for s in QUICK), []))
    assert code == 0
    return out


def test_compress_writes_the_run_folder(quick_run):
    for name in ("config.yaml", "metrics.jsonl", "structure.json", "report.json", "model/model.safetensors",
                 "model/uvclab.json"):
        assert (quick_run / name).is_file(), name
    report = json.loads((quick_run / "report.json").read_text())
    for key in ("teacher_top1", "top1", "macs_ratio", "params_ratio"):
        assert isinstance(report[key], float)
    assert 0.48 <= report["macs_ratio"] <= 0.5  # within [B - 0.02, B]
    assert report["params_ratio"] < 1


def test_exported_model_loads_and_reproduces_the_report(quick_run):
    from uvclab.engine.data import load_dataset
    report = json.loads((quick_run / "report.json").read_text())
    model = uvclab.load_pruned(quick_run / "model")
    splits = load_dataset("digits")
    assert evaluate(model, splits.test) == pytest.approx(report["top1"])
    st = Structure.load(quick_run / "structure.json")
    base = uvclab.create_vit(report["model"]["name"], **report["model"]["kwargs"])
    assert uvclab.count(base, st, report["layout"])["macs"] == report["macs"]


def test_metrics_log_traces_the_search(quick_run):
    recs = [json.loads(l) for l in (quick_run / "metrics.jsonl").read_text().splitlines()]
    search = [r for r in recs if r["stage"] == "search"]
    assert search[0]["warmup"] and not search[-1]["warmup"]
    assert all(r["z"] >= 0 for r in search)
    for key in ("heads_removed", "neurons_removed", "dims_removed", "keep_prob", "expected_macs_ratio", "loss"):
        assert key in search[-1]
    assert any(r["stage"] == "finetune_epoch" for r in recs)


@pytest.mark.slow   # three runs: about 35 s under load (full tier)
def test_resume_gives_the_same_result(tmp_path, monkeypatch):
    cfg = quick_cfg()
    ref = train.compress(cfg, tmp_path / "ref")
    calls = {"n": 0}
    real = train.save_checkpoint

    def crash_after_two(path, state):
        real(path, state)
        calls["n"] += 1
        if calls["n"] == 2:  # killed right after the 2nd checkpoint (mid-search)
            raise KeyboardInterrupt

    for stage in (train, checkpointing):
        monkeypatch.setattr(stage, "save_checkpoint", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        train.compress(cfg, tmp_path / "run")
    for stage in (train, checkpointing):
        monkeypatch.setattr(stage, "save_checkpoint", real)
    with pytest.raises(UvclabError, match="--resume"):
        train.compress(cfg, tmp_path / "run")
    resumed = train.compress(cfg, tmp_path / "run", resume=True)
    assert resumed["top1"] == ref["top1"] and resumed["macs"] == ref["macs"]
    assert (tmp_path / "run/structure.json").read_text() == (tmp_path / "ref/structure.json").read_text()
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(uvclab.load_pruned(tmp_path / "run/model")(x), uvclab.load_pruned(tmp_path / "ref/model")(x))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = quick_cfg()
    real = distill.distillation_loss
    calls = {"n": 0}

    def nan_later(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] > 15 else loss

    monkeypatch.setattr(distill, "distillation_loss", nan_later)
    with pytest.raises(UvclabError, match="Non-finite loss"):
        train.compress(cfg, tmp_path / "run")
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["stage"] == "search" and ckpt["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize("override,msg", [
    ("macs_ratio=1.5", r"outside \(0, 1\]"), ("dataset=mnist", "Unknown dataset"), ("kd=fancy", "kd="),
    ("teacher=missing.json", "not found"), ("nonsense=1", "Unknown config key"),
    ("lr=fast", "lr='fast' must be a number"), ("batch_size=2.5", "must be an integer"),
    ("uvc.ylr=[1]", r"uvc.ylr=\[1\] must be a number"),
])
def test_bad_input_is_a_clear_cli_error(capsys, tmp_path, override, msg):
    code = main(["compress", "--out", str(tmp_path / "x"), "--set", override] + sum((["--set", s] for s in QUICK), []))
    err = capsys.readouterr().err
    assert code == 2 and __import__("re").search(msg, err) and "Traceback" not in err


def test_scientific_notation_is_a_number(tmp_path):
    """YAML 1.1 (PyYAML) reads `3e-5` as a string; config files and --set must still give floats."""
    (tmp_path / "c.yaml").write_text("lr: 3e-4\nuvc:\n  ylr: 3e-5\n  count_lr: 1\n")
    cfg = load_config(tmp_path / "c.yaml", ["uvc.zlr=2e-1", "finetune_lr=5E-5"])
    assert (cfg.lr, cfg.uvc.ylr, cfg.uvc.count_lr, cfg.uvc.zlr, cfg.finetune_lr) == (3e-4, 3e-5, 1.0, 0.2, 5e-5)
    assert all(isinstance(v, float) for v in (cfg.lr, cfg.uvc.ylr, cfg.uvc.count_lr))


@pytest.mark.slow
def test_ddp_two_cpu_processes_agree(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           "-m", "uvclab", "compress", "--out", str(tmp_path / "ddp"), "--set", "batch_size=32",
           "--set", "select_skips=validation", "--set", "select_finetune_steps=2"] + \
        sum((["--set", s] for s in QUICK), [])
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "ddp" / "report.json").read_text())
    assert report["world_size"] == 2
    assert report["macs_ratio"] <= 0.5  # skip candidates (rank 0 scores them, every rank gets its choice)
    assert report["selection"]["skip_candidates"][0]["skipped"] == []


def test_local_checkpoint_start_and_t2t_backbone(tmp_path):
    """A student/teacher from a local weights file (the offline twin of pretrained=True), on T2T-ViT."""
    from safetensors.torch import save_file
    kw = dict(img_size=32, in_chans=1, num_classes=10, depth=3, embed_dim=64, num_heads=2)
    torch.manual_seed(0)
    src = uvclab.create_vit("t2t_vit_7", **kw)
    save_file(src.state_dict(), str(tmp_path / "start.safetensors"))
    cfg = quick_cfg("model=t2t_vit_7", f"model_kwargs={json.dumps(kw)}", "teacher=null",
                    f"checkpoint={tmp_path / 'start.safetensors'}", "finetune_epochs=0",
                    "macs_ratio=0.95")  # at 32x32 the T2T stem alone is 0.89 of the MACs
    report = train.compress(cfg, tmp_path / "t2t")
    assert report["model"]["name"] == "t2t_vit_7" and 0.93 <= report["macs_ratio"] <= 0.95
    from uvclab.engine.data import load_dataset
    splits = load_dataset("digits", img_size=32)
    # the teacher is the starting checkpoint itself
    src.eval()
    assert report["teacher_top1"] == pytest.approx(evaluate(src, splits.test))
    slim = uvclab.load_pruned(tmp_path / "t2t" / "model")
    assert evaluate(slim, splits.test) == pytest.approx(report["top1"])


REPORT_KEYS = {"method", "budget", "macs_ratio", "params_ratio", "top1", "val_top1", "val_top1_before_finetune",
               "search_end_macs_ratio",
               "teacher_top1", "blocks_kept", "train_images", "macs", "dense_macs"}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["magnitude", "uniform", "depth", "torch_pruning"])
def test_every_method_runs_through_the_same_pipeline(tmp_path, quick_run, method):
    """`--set method=...`: a one-shot structure, then the same export, fine-tune, report and files as UVC
    (safetensors + JSON; nothing a loader would unpickle)."""
    out = tmp_path / method
    short = ["warmup_epochs=0", "search_epochs=1", "finetune_epochs=1", "max_steps_per_epoch=3", "progress=false",
             "calibration.samples=256"]
    code = main(["compress", "--out", str(out), "--set", f"method={method}"] + sum((["--set", s] for s in short), []))
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    uvc_report = json.loads((quick_run / "report.json").read_text())
    assert REPORT_KEYS <= set(report) and set(report) == set(uvc_report)
    assert report["method"] == method and uvc_report["method"] == "uvc"
    assert report["macs_ratio"] <= 0.5 and report["train_images"] == (0 + 1 + 1) * 3 * 64  # what UVC would see
    assert not [p.name for p in out.rglob("*") if p.suffix in (".pt", ".pkl") and p.name != "checkpoint.pt"]
    model = uvclab.load_pruned(out / "model")
    assert uvclab.count(model)["macs"] == report["macs"]
    st = Structure.load(out / "structure.json")
    assert model.uvclab_export["structure"] == st.to_dict()


def test_model_and_data_that_do_not_fit_are_clear_errors(tmp_path):
    base = QUICK + ["model=deit_tiny_patch16_224", "teacher=null", "dataset=digits"]
    with pytest.raises(UvclabError, match=r"does not fit the digits images \(1x8x8\).*model_kwargs.img_size"):
        train.compress(load_config(overrides=base), tmp_path / "a")
    with pytest.raises(UvclabError, match="in_chans=3 but digits has in_chans=1"):
        train.compress(load_config(overrides=base + ["model_kwargs.in_chans=3"]), tmp_path / "b")
    with pytest.raises(UvclabError, match="num_classes=1000 but digits has num_classes=10"):
        train.compress(load_config(overrides=base + ["model_kwargs.num_classes=1000"]), tmp_path / "c")


def test_a_named_model_takes_channels_classes_and_size_from_the_data(tmp_path):
    kw = ["model_kwargs.patch_size=2", "model_kwargs.embed_dim=24", "model_kwargs.depth=2",
          "model_kwargs.num_heads=2"]
    cfg = quick_cfg("model=deit_tiny_patch16_224", "teacher=null", "finetune_epochs=0", "search_epochs=1",
                    "warmup_epochs=0", "max_steps_per_epoch=2", *kw)
    report = train.compress(cfg, tmp_path / "named")
    assert report["model"]["kwargs"] | {} == {"img_size": 8, "in_chans": 1, "num_classes": 10, "patch_size": 2,
                                             "embed_dim": 24, "depth": 2, "num_heads": 2}


def test_final_weights_start_cuts_the_searched_structure_from_the_starting_weights(tmp_path):
    """uvc.final_weights=start: the export holds the teacher's weights at the searched structure's kept groups
    (no repair, no fine-tune); the default keeps the weights the search trained, which differ."""
    from uvclab.engine.compress import build_models
    from uvclab.vit.export import load_pruned
    base = ["warmup_epochs=0", "search_epochs=1", "finetune_epochs=0", "max_steps_per_epoch=4", "progress=false",
            "threads=1", "lr=1e-3"]
    start = train.compress(load_config(overrides=base + ["uvc.final_weights=start"]), tmp_path / "start")
    search = train.compress(load_config(overrides=base), tmp_path / "search")
    assert start["final_weights"] == "start" and "final_weights" not in search
    teacher = build_models(load_config(overrides=base))[0]  # the student as it starts: the teacher's weights
    for run, same in (("start", True), ("search", False)):
        slim, st = load_pruned(tmp_path / run / "model"), Structure.load(tmp_path / run / "structure.json")
        l, b = next((l, b) for l, b in enumerate(st.blocks) if b.keep and b.runs_mlp)
        s_blk = [m for m in slim.blocks if getattr(m, "mlp", None) is not None][0]
        ref = teacher.blocks[l].mlp.fc1.weight[b.mlp]
        assert torch.equal(s_blk.mlp.fc1.weight, ref) is same
    with pytest.raises(UvclabError, match="final_weights"):
        load_config(overrides=["uvc.final_weights=teacher"])
