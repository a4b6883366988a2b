import json
import subprocess
import sys

import pytest

from uvclab.ui.cli import main

from conftest import random_structure, small_vit


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_macs_json(capsys):
    code, out, _ = run(capsys, "macs", "deit_tiny_patch16_224", "--json")
    d = json.loads(out)
    assert code == 0 and d["macs"] == 1_253_683_200 and d["params"] == 5_717_416


def test_macs_table_and_structure(capsys, tmp_path):
    m = small_vit()
    s = random_structure(m)
    s.save(tmp_path / "s.json")
    args = ["macs", "deit_small_patch16_224", "--img-size", "32", "--num-classes", "10",
            "--model-arg", "patch_size=8", "--model-arg", "depth=4"]
    code, out, _ = run(capsys, *args)
    assert code == 0 and "fc1" in out and "MACs" in out
    code, out, _ = run(capsys, *args, "--structure", str(tmp_path / "s.json"), "--json")
    import uvclab
    assert json.loads(out)["macs"] == uvclab.count(m, s)["macs"]


@pytest.mark.parametrize("argv,msg", [
    (["macs", "deit_tiny_patch16_2240"], "Unknown model"),
    (["macs", "deit_tiny_patch16_224", "--structure", "missing.json"], "does not exist"),
    (["bench", "deit_tiny_patch16_224", "--macs-ratio", "1.5"], "outside (0, 1]"),
])
def test_errors_without_traceback(capsys, argv, msg):
    code, _, err = run(capsys, *argv)
    assert code == 2 and msg in err and "Traceback" not in err


def test_structure_mismatch_from_cli(capsys, tmp_path):
    random_structure(small_vit()).save(tmp_path / "s.json")
    code, _, err = run(capsys, "macs", "deit_tiny_patch16_224", "--structure", str(tmp_path / "s.json"))
    assert code == 2 and "does not fit the model" in err


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "uvclab", "macs", "deit_small_patch16_224", "--json"],
                       capture_output=True, text=True, check=True)
    assert json.loads(r.stdout)["macs"] == 4_598_882_304


# ---- uvclab runs / uvclab show -------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_root(tmp_path_factory):
    """One real small UVC run (a few seconds) and a hand-written latency-budget report of an older version
    (no test size, no structure.json)."""
    from small_runs import make_small_runs
    root = tmp_path_factory.mktemp("runs")
    runs = make_small_runs(root, which=("sweep/uvc_b0.50",))
    old = root / "old" / "lat"
    old.mkdir(parents=True)
    (old / "report.json").write_text(json.dumps({
        "method": "uvc", "dataset": "digits", "model": {"name": "deit_tiny_patch16_224", "kwargs": {}}, "seed": 3,
        "macs_ratio_target": 0.3, "budget_kind": "latency", "top1": 80.0, "macs_ratio": 0.21, "seconds": 12.0,
        "latency_ratio_measured": 0.287}))
    return root, runs["sweep/uvc_b0.50"]


def test_runs_lists_every_run(capsys, run_root):
    root, folder = run_root
    report = json.loads((folder / "report.json").read_text())
    code = main(["runs", str(root), "--json"])
    rows = {r["run"]: r for r in json.loads(capsys.readouterr().out)}
    assert code == 0 and set(rows) == {"sweep/uvc_b0.50", "old/lat"}
    new, old = rows["sweep/uvc_b0.50"], rows["old/lat"]
    assert (new["method"], new["budget"], new["seed"], new["budget_kind"]) == ("uvc", 0.5, 0, "macs")
    assert new["top1"] == report["top1"] and new["test_samples"] == report["test_samples"] == 270
    assert new["macs_ratio"] == report["macs_ratio"] and new["latency_ratio_measured"] is None
    assert (old["budget"], old["test_samples"], old["latency_ratio_measured"]) == (0.3, None, 0.287)
    code = main(["runs", str(root)])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and lines[0].split() == ["run", "method", "budget", "seed", "top-1", "%", "test", "imgs",
                                              "MACs", "latency", "time", "s"]
    assert lines[1].split() == ["old/lat", "uvc", "0.30", "latency", "3", "80.00", "-", "0.210", "0.287", "12"]
    assert lines[2].split()[:7] == ["sweep/uvc_b0.50", "uvc", "0.50", "macs", "0", f"{report['top1']:.2f}", "270"]
    assert lines[-1].startswith("2 runs under")


def test_runs_default_root_and_errors(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("UVCLAB_RUNS", str(tmp_path))
    code = main(["runs"])
    assert code == 0 and capsys.readouterr().out.strip() == f"no finished runs under {tmp_path}"
    monkeypatch.setenv("UVCLAB_RUNS", str(tmp_path / "never_made"))      # a new user's default: not an error
    code = main(["runs", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out) == []
    code = main(["runs", str(tmp_path / "missing")])
    assert code == 2 and "is not a folder" in capsys.readouterr().err
    code = main(["show", str(tmp_path)])
    assert code == 2 and "No report.json" in capsys.readouterr().err


def test_show_report_structure_and_files(capsys, run_root):
    from uvclab.vit.structure import Structure
    _, folder = run_root
    s = Structure.load(folder / "structure.json")
    code = main(["show", str(folder), "--json"])
    d = json.loads(capsys.readouterr().out)
    assert code == 0 and d["report"] == json.loads((folder / "report.json").read_text())
    blocks = d["structure"]["blocks"]
    assert [b["heads"] for b in blocks] == [len(b.heads) if b.runs_attn else 0 for b in s.blocks]
    assert [b["mlp"] for b in blocks] == [len(b.mlp) if b.runs_mlp else 0 for b in s.blocks]
    assert [b["v_dims"] for b in blocks] == [sum(map(len, b.v_dims)) if b.runs_attn else 0 for b in s.blocks]
    assert {"report.json", "structure.json", "config.yaml", "metrics.jsonl", "model/model.safetensors"} <= set(
        d["files"]) and d["figures"] == []
    code = main(["show", str(folder)])
    out = capsys.readouterr().out
    assert code == 0 and f"on {d['report']['test_samples']} test images" in out and str(folder / "report.json") in out
    b0 = blocks[0]
    row = f"0 {b0['heads']}/{s.num_heads} {b0['v_dims']}/{s.num_heads * s.head_dim} {b0['mlp']}/{s.mlp_hidden}"
    assert any(" ".join(line.split()).startswith(row) for line in out.splitlines())


def test_readme_glossary_names_every_report_field(run_root):
    from uvclab.paths import REPO_ROOT
    readme = (REPO_ROOT / "README.md").read_text()
    glossary = readme[readme.index("## report.json"):]
    report = json.loads((run_root[1] / "report.json").read_text())
    assert [k for k in report if f"`{k}`" not in glossary] == []
