"""ONNX export of exported (slim) models: ONNX Runtime reproduces PyTorch, the card travels in the metadata,
bad input is a clear error, and dense vs slim can be timed inside ONNX Runtime."""
import json
import sys

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import uvclab  # noqa: E402
from uvclab.compare.deploy import OrtModel, export_onnx, ort_op_profile  # noqa: E402
from uvclab.compare.throughput import compare_throughput  # noqa: E402
from uvclab.errors import UvclabError  # noqa: E402
from uvclab.prune.baselines import depth_structure  # noqa: E402
from uvclab.vit import onnx as vit_onnx  # noqa: E402
from uvclab.vit.export import export_model, save_pruned  # noqa: E402
from uvclab.vit.onnx import ort_session, read_onnx_metadata, run_session  # noqa: E402

from conftest import random_structure, small_vit  # noqa: E402


def _ort_logits(path, x):
    return run_session(ort_session(str(path)), x)


T2T = dict(img_size=32, depth=4, num_classes=10)


@pytest.mark.parametrize("name,layout,batch_size,kw,exporter", [
    ("deit_small_patch16_224", "compact", None, {}, "dynamo"),     # v narrower than q/k: explicit-matmul attention
    pytest.param("deit_small_patch16_224", "fused", 3, {}, "dynamo", marks=pytest.mark.slow),  # padded, SDPA; fixed batch
    pytest.param("deit_tiny_distilled_patch16_224", "compact", None, {}, "dynamo", marks=pytest.mark.slow),  # two heads
    pytest.param("t2t_vit_7", "compact", None, T2T, "dynamo", marks=pytest.mark.slow),  # Performer T2T stem
    pytest.param("t2t_vit_7", "compact", None, dict(T2T, tokens_type="transformer"), "torchscript",
                 marks=pytest.mark.slow),  # Transformer T2T stem: 3-D SDPA, dynamo fails, TorchScript fallback
])
def test_onnx_equals_pytorch_for_each_layout_skip_pattern_and_family(tmp_path, name, layout, batch_size, kw, exporter):
    m = uvclab.create_vit(name, **kw).eval() if kw else small_vit(name)
    s = random_structure(m, seed=1)            # pruned heads/dims/neurons, a skipped block, attn and mlp branches
    e = export_model(m, s, layout)
    res = export_onnx(e, tmp_path / "m.onnx", batch_size=batch_size)
    assert res.max_abs_diff <= 1e-4 and res.exporter == exporter
    x = torch.randn(batch_size or 5, 3, 32, 32)    # a batch size it was not traced with (dynamic axis)
    with torch.no_grad():
        ref = e(x)
    assert (_ort_logits(tmp_path / "m.onnx", x) - ref).abs().max() <= 1e-4
    meta = read_onnx_metadata(tmp_path / "m.onnx")
    assert meta["model"] == name and meta["layout"] == layout
    assert int(meta["macs"]) == uvclab.count(m, s, layout)["macs"] and int(meta["dense_macs"]) == uvclab.count(m)["macs"]
    assert uvclab.Structure.from_dict(json.loads(meta["structure"])).to_dict() == s.to_dict()


def _run_folder(tmp, top1=91.5):
    """A run folder as `uvclab compress` leaves it: config.yaml, report.json, model/ (digits-sized model)."""
    torch.manual_seed(0)
    m = uvclab.create_vit("deit_tiny_patch16_224", img_size=8, patch_size=2, in_chans=1, num_classes=10, depth=2,
                          embed_dim=48, num_heads=3).eval()
    save_pruned(export_model(m, random_structure(m, seed=2, skip=False)), tmp / "model", extra={"top1": top1})
    uvclab.load_config(overrides=["dataset=digits"]).save(tmp / "config.yaml")
    (tmp / "report.json").write_text(json.dumps({"method": "uvc", "budget": 0.5, "top1": top1, "dataset": "digits"}))
    return tmp


def test_cli_exports_a_run_folder_verified_on_its_test_images(tmp_path, capsys):
    from uvclab.ui.cli import main
    run = _run_folder(tmp_path / "run")
    assert main(["export-onnx", str(run), "--dynamic-batch", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["path"] == str(run / "model" / "model.onnx") and out["batch_size"] is None
    assert out["verified_on"] == "digits test images" and out["num_images"] == 16 and out["max_abs_diff"] <= 1e-4
    meta = read_onnx_metadata(run / "model" / "model.onnx")
    assert meta["top1"] == "91.5" and meta["method"] == "uvc" and meta["dataset"] == "digits"
    assert int(meta["macs"]) == json.loads((run / "model" / "uvclab.json").read_text())["macs"]


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    from uvclab.ui.cli import main
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(UvclabError, match="holds no exported model"):
        export_onnx(tmp_path / "empty_run", tmp_path / "m.onnx")
    assert main(["export-onnx", str(tmp_path / "empty_run")]) == 2
    assert "holds no exported model" in capsys.readouterr().err
    m = small_vit(depth=1)
    e = export_model(m, random_structure(m))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(UvclabError, match="is a file, not a folder"):
        export_onnx(e, tmp_path / "a_file" / "m.onnx")
    with pytest.raises(UvclabError, match="is a folder"):
        export_onnx(e, tmp_path)
    with pytest.raises(UvclabError, match="batch_size must be"):
        export_onnx(e, tmp_path / "m.onnx", batch_size=0)


def test_a_mismatch_fails_and_writes_nothing(tmp_path, monkeypatch):
    m = small_vit(depth=1)
    e = export_model(m, random_structure(m))
    real = vit_onnx.run_session
    monkeypatch.setattr(vit_onnx, "run_session", lambda s, x: real(s, x) + 1e-3)  # a runtime off by 1e-3
    with pytest.raises(UvclabError, match="differs from PyTorch by 0.001"):
        export_onnx(e, tmp_path / "m.onnx", exporter="torchscript")   # the fast exporter: the check is the test
    assert not list(tmp_path.iterdir())


def test_missing_deploy_extra_names_it(monkeypatch, tmp_path):
    assert uvclab.export_onnx is export_onnx
    monkeypatch.setitem(sys.modules, "onnxruntime", None)   # `import onnxruntime` now raises ImportError
    with pytest.raises(UvclabError, match=r"pip install 'uvclab\[deploy\]'.*onnxruntime|onnxruntime.*uvclab\[deploy\]"):
        vit_onnx.require_deploy()
    m = small_vit(depth=1)
    with pytest.raises(UvclabError, match="deploy"):
        export_onnx(export_model(m, random_structure(m)), tmp_path / "m.onnx")
    with pytest.raises(UvclabError, match="deploy"):
        compare_throughput(m, export_model(m, random_structure(m)), runtime="onnxruntime")


@pytest.mark.slow
def test_ort_bench_times_a_much_smaller_model_as_faster_and_profiles_ops():
    m = small_vit(depth=6)
    e = export_model(m, depth_structure(m, 0.2))                    # 1 of 6 blocks left: ~5x fewer MACs
    dense = OrtModel(m, 32, threads=1)
    r = compare_throughput(dense, e, batch_size=32, rounds=5, iters=2, runtime="onnxruntime", threads=1)
    assert r.runtime == "onnxruntime" and r.speedup > 1.5, r
    assert r.dense_macs == uvclab.count(m)["macs"] and r.exported_macs == uvclab.count(e)["macs"]
    with pytest.raises(UvclabError, match="exported for batch 32"):
        dense(torch.randn(2, 3, 32, 32))
    prof = ort_op_profile(dense, runs=2)                           # profiles the session as timed
    assert abs(prof.share.sum() - 1) < 1e-6 and prof.ms.gt(0).all()
    assert {"MatMul", "Gemm", "FusedMatMul"} & set(prof.op[:3])     # matmuls dominate a ViT


@pytest.mark.slow
def test_cli_bench_in_onnxruntime(capsys):
    from uvclab.ui.cli import main
    assert main(["bench", "deit_tiny_patch16_224", "--img-size", "32", "--model-arg", "patch_size=8", "--model-arg",
                 "depth=2", "--runtime", "onnxruntime", "--threads", "1", "--rounds", "1", "--batch-size", "2",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["runtime"] == "onnxruntime" and r["dense_img_per_s"] > 0 and r["macs_speedup"] > 1.9
