"""benchmarks/gpu_check.py at a tiny size on CPU: every step runs, the tables and projections come out."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGENET = 1_281_167


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_runs_on_cpu_and_projects_the_params_files(tmp_path):
    params = tmp_path / "params"
    params.mkdir()
    (params / "tiny.yaml").write_text("model: deit_tiny_patch16_224\nwarmup_epochs: 1\nsearch_epochs: 2\n"
                                      "finetune_epochs: 4\n")
    (params / "base.yaml").write_text("model: deit_base_patch16_224\nsearch_epochs: 1\nfinetune_epochs: 1\n")
    result = load_gpu_check().main(["--device", "cpu", "--models", "deit_tiny_patch16_224", "--depth", "1",
                                    "--img-size", "32", "--steps", "1", "--warmup", "0", "--batch-size", "2",
                                    "--params", str(params), "--out", str(tmp_path / "out")])
    assert json.loads((tmp_path / "out/gpu_check.json").read_text()) == json.loads(json.dumps(result))
    rows = {(r["step"], r["amp"]): r for r in result["steps"]}
    assert set(rows) == {(k, a) for k in ("kd", "search", "finetune") for a in ("none", "bf16")}
    assert all(r["finite"] and r["img_per_s"] > 0 and r["peak_mem_mb"] > 0 for r in rows.values())
    proj = {(p["params"], p["amp"]): p for p in result["projections"]}
    tiny = proj[("tiny.yaml", "bf16")]
    assert tiny["stage1_h"] == pytest.approx(3 * IMAGENET / rows[("search", "bf16")]["img_per_s"] / 3600)
    assert tiny["stage2_h"] == pytest.approx(4 * IMAGENET / rows[("finetune", "bf16")]["img_per_s"] / 3600)
    assert proj[("base.yaml", "none")]["total_h"] is None  # model not measured
    md = (tmp_path / "out/gpu_check.md").read_text()
    assert "Unmeasured on GPU" in md and "| tiny.yaml | bf16 |" in md


def test_synthetic_imagefolder_layout(tmp_path):
    root = load_gpu_check().write_imagefolder(tmp_path, classes=3, per_class=2, size=16)
    for split in ("train", "val"):
        assert sorted(p.name for p in (root / split).iterdir()) == ["class0", "class1", "class2"]
        assert len(list((root / split).rglob("*.png"))) == 6
