"""The README is a user guide: short, set-up / main job / results in its first 100 lines, and its results table
is computed from the committed benchmark results (never typed by hand).

`python tests/test_readme.py` prints the table to paste between the README's `results-table` markers.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CSV = ROOT / "benchmarks" / "results" / "fashion_mnist.csv"
METHODS = ["uvc", "magnitude", "magnitude_lstsq", "activation_lstsq", "isomorphic_lstsq", "torch_pruning_lstsq",
           "depth"]                                    # UVC, the classic cut, the repaired (best) baselines, depth
BUDGETS = [0.5, 0.3, 0.2, 0.15]
MARK = re.compile(r"<!-- results-table -->\n(.*?)<!-- /results-table -->", re.S)


def results_table(csv: Path = CSV) -> str:
    """UVC against the baselines on Fashion-MNIST: mean top-1 over seeds and its standard deviation, validation
    before fine-tuning, MACs and the measured latency ratio (1 / PyTorch speedup)."""
    d = pd.read_csv(csv)
    d = d[d.method.isin(METHODS) & d.budget.round(3).isin(BUDGETS)]
    s = d.groupby(["budget", "method"]).agg(
        repair=("repair", "first"), seeds=("seed", "count"), top1=("top1", "mean"), sd=("top1", "std"),
        teacher=("teacher_top1", "mean"), before=("val_top1_before_finetune", "mean"),
        macs=("macs_ratio", "mean"), speedup=("speedup", "mean")).reset_index()
    s["order"] = s.method.map(METHODS.index)          # a fixed order: the table does not rank within-noise gaps
    s = s.sort_values(["budget", "order"], ascending=[False, True])
    lines = ["| budget | method | repair | seeds | top-1 % (mean ± sd) | vs teacher | val before fine-tune | MACs "
             "| latency |", "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in s.itertuples():
        spread = f" ± {r.sd:.2f}" if r.seeds > 1 else ""
        name = f"**{r.method}**" if r.method == "uvc" else r.method
        latency = f"{1 / r.speedup:.2f}" if pd.notna(r.speedup) else "-"
        lines.append(f"| {r.budget:g} | {name} | {r.repair} | {r.seeds} | {r.top1:.2f}{spread} | "
                     f"{r.top1 - r.teacher:+.2f} | {r.before:.1f} | {r.macs:.3f} | {latency} |")
    return "\n".join(lines) + "\n"


def test_results_table_is_computed_from_the_csv():
    m = MARK.search(README.read_text())
    assert m, "README.md lacks the <!-- results-table --> markers"
    assert m.group(1) == results_table(), "README's results table differs from benchmarks/results/fashion_mnist.csv: " \
                                          "paste the output of `python tests/test_readme.py`"


def test_results_table_reads_the_seeds():
    t = results_table()
    uvc03 = next(line for line in t.splitlines() if line.startswith("| 0.3 | **uvc**"))
    runs = pd.read_csv(CSV).query("method == 'uvc' and budget == 0.3")
    assert uvc03.split(" | ")[3:5] == [str(len(runs)), f"{runs.top1.mean():.2f} ± {runs.top1.std():.2f}"]
    assert len(runs) >= 3


def test_readme_is_a_short_guide():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move details to docs/"
    first = "\n".join(lines[:100])
    for must in ("pip install -e", "pytest -q", "uvclab compress", "top-1", "<!-- results-table -->"):
        assert must in first, f"'{must}' is not in the README's first 100 lines"


def test_links_between_readme_and_docs_resolve():
    for doc in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for link in re.findall(r"\]\(([^)#\s]+)", doc.read_text()):
            if not re.match(r"[a-z]+://", link):
                assert (doc.parent / link).exists(), f"{doc.name} links to {link}, which does not exist"


if __name__ == "__main__":
    print(results_table(), end="")
