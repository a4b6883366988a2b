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
