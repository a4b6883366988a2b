"""The README is a user guide: short, set-up / main job / results in its first 100 lines, and its results, regime and
equal-latency tables are computed from the committed benchmark results (never typed by hand).

`python tests/test_readme.py` prints the tables to paste between the README's `results-table`,
`regime-table` and `latency-table` markers.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CSV = ROOT / "benchmarks" / "results" / "fashion_mnist.csv"
METHODS = ["uvc", "uvc_start_lstsq", "magnitude", "magnitude_lstsq", "activation_lstsq", "isomorphic_lstsq",
           "torch_pruning_lstsq", "depth"]                                    # UVC, the classic cut, the repaired (best) baselines, depth
BUDGETS = [0.5, 0.3, 0.2, 0.15]
MARK = re.compile(r"<!-- results-table -->\n(.*?)<!-- /results-table -->", re.S)
LATENCY_CSV = ROOT / "benchmarks" / "results" / "latency_budget_fm.csv"
LONG_CSV = ROOT / "benchmarks" / "results" / "fashion_mnist_long.csv"
REGIME_UVC = ["uvc", "uvc_start_lstsq"]              # the default search, and its structure on the teacher's weights
REGIME_MARK = re.compile(r"<!-- regime-table -->\n(.*?)<!-- /regime-table -->", re.S)
LATENCY_MARK = re.compile(r"<!-- latency-table -->\n(.*?)<!-- /latency-table -->", re.S)


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
        name = f"**{r.method}**" if r.method.startswith("uvc") else r.method
        latency = f"{1 / r.speedup:.2f}" if pd.notna(r.speedup) else "-"
        lines.append(f"| {r.budget:g} | {name} | {r.repair} | {r.seeds} | {r.top1:.2f}{spread} | "
                     f"{r.top1 - r.teacher:+.2f} | {r.before:.1f} | {r.macs:.3f} | {latency} |")
    return "\n".join(lines) + "\n"


def regime_table(short: Path = CSV, long: Path = LONG_CSV) -> str:
    """Where UVC is the better choice, per protocol and budget (`uvclab.compare.benchmark.regime_table`: the
    best one-shot method chosen on validation, the per-seed gap over shared seeds and its verdict)."""
    from uvclab.compare.benchmark import regime_table as regimes
    lines = ["| protocol | budget | UVC setting | its top-1 | best one-shot (on validation) | gap, paired (seeds) | "
             "verdict |", "|---|---:|---|---:|---|---:|---|"]
    sd = lambda v, n: f" ± {v:.2f}" if n > 1 else ""  # noqa: E731
    for name, csv in (("short", short), ("long (5x steps)", long)):
        df = pd.read_csv(csv)
        rows = [r for v in REGIME_UVC if v in set(df.method) for r in regimes(df, v).assign(v=v).itertuples()]
        for r in sorted(rows, key=lambda r: (-r.budget, REGIME_UVC.index(r.v))):
            lines.append(f"| {name} | {r.budget:g} | {r.v} | {r.uvc:.2f}{sd(r.uvc_sd, r.uvc_seeds)} | {r.baseline} "
                         f"{r.baseline_top1:.2f}{sd(r.baseline_sd, r.baseline_seeds)} | {r.paired_gap:+.2f}"
                         f"{sd(r.paired_sd, r.paired_seeds)} ({r.paired_seeds}) | {r.verdict} |")
    return "\n".join(lines) + "\n"


def test_regime_table_is_computed_from_the_csvs():
    m = REGIME_MARK.search(README.read_text())
    assert m, "README.md lacks the <!-- regime-table --> markers"
    assert m.group(1) == regime_table(), "README's regime table differs from the benchmark CSVs: paste the " \
        "output of `python tests/test_readme.py`"


def latency_table(csv: Path = LATENCY_CSV) -> str:
    """UVC at its measured latency against every one-shot cut read there (all exports timed in one process;
    `uvclab.compare.same_latency`): the latency budget, and the MACs budgets (the default search and its structures
    on the teacher's weights) at 0.5 and 0.3."""
    from uvclab.compare.benchmark import ONE_SHOT_METHODS
    from uvclab.compare.same_latency import equal_latency_table
    d = pd.read_csv(csv).rename(columns={"kind": "method", "latency_ratio_measured": "latency"})
    one_shot = [m for m in ONE_SHOT_METHODS if m in set(d.method)]
    lines = ["| UVC setting | budget | measured latency (max) | its top-1 | best one-shot cut at that latency (on "
             "validation) | gap |", "|---|---:|---:|---:|---|---:|"]
    for ref, budgets in (("uvc_latency", "latency"), ("uvc", "MACs"), ("uvc_start_lstsq", "MACs")):
        if ref not in set(d.method):
            continue
        t = equal_latency_table(d, ref, one_shot)
        for r in t[t.budget.isin([0.5, 0.3])].sort_values("budget", ascending=False).itertuples():
            none = pd.isna(r.best_baseline)
            lines.append(f"| {ref} | {budgets} {r.budget:g} | {r.latency:.3f} ({r.latency_max:.3f}) | "
                         f"{r.top1:.2f} ± {r.top1_sd:.2f} ({r.seeds}) | "
                         f"{'none reaches it' if none else f'{r.best_baseline} {r.baseline_top1:.2f}'} | "
                         f"{'-' if none else f'{r.gap:+.2f}'} |")
    return "\n".join(lines) + "\n"


def test_latency_table_is_computed_from_the_csv():
    m = LATENCY_MARK.search(README.read_text())
    assert m, "README.md lacks the <!-- latency-table --> markers"
    assert m.group(1) == latency_table(), "README's equal-latency table differs from " \
        "benchmarks/results/latency_budget_fm.csv: paste the output of `python tests/test_readme.py`"


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
    print()
    print(regime_table(), end="")
    print()
    print(latency_table(), end="")
