"""The `uvclab` command line: a thin layer over the library.

  uvclab macs MODEL [--img-size N] [--num-classes K] [--structure FILE] [--layout L] [--json]
  uvclab bench MODEL [--macs-ratio R | --structure FILE] [--batch-size B] [--runtime onnxruntime] [--json]
  uvclab export-onnx RUN_DIR [--out FILE] [--dynamic-batch | --batch-size B] [--opset N] [--json]
  uvclab compress [CONFIG.yaml] [--set key=value ...] [--out DIR] [--resume [auto]]
  uvclab latency-table MODEL [--batch-size B] [--threads T] [--device D] [--rebuild] [--json]
  uvclab teacher [CONFIG.yaml] --model NAME --dataset NAME [--set key=value ...] --out STEM
  uvclab runs [ROOT] [--json]            one row per finished run folder under ROOT (default: the runs folder)
  uvclab show RUN_DIR [--json]           one run: its report, structure per block, files
Every `--set` / `--model-arg` goes through the one parser (`uvclab.engine.config.parse_overrides`).
User mistakes (UvclabError) print one clear message, no traceback, exit code 2. A `compress` stopped by
SIGTERM / SIGUSR1 (after the current step, with a checkpoint) prints one line and exits with 75
(EX_TEMPFAIL, `Preempted.exit_status`): run the same command with --resume to continue.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Optional

from uvclab.engine.config import parse_overrides
from uvclab.engine.strategies import STRATEGIES
from uvclab.errors import Preempted, UvclabError


def _model_kwargs(args) -> dict:
    kw = {}
    if getattr(args, "img_size", None):
        kw["img_size"] = args.img_size
    if getattr(args, "num_classes", None) is not None:
        kw["num_classes"] = args.num_classes
    return parse_overrides(getattr(args, "model_arg", None), kw)


def cmd_macs(args) -> None:
    from uvclab.vit import macs as budget
    from uvclab.vit.models import create_vit
    from uvclab.vit.structure import Structure
    import torch
    with torch.device("meta"):
        model = create_vit(args.model, **_model_kwargs(args))
    structure = Structure.load(args.structure) if args.structure else None
    if structure is not None:
        structure.validate(model)
    table = budget.macs_table(model, structure, args.layout)
    dense = budget.count(model)
    total = {"macs": int(table.macs.sum()), "params": int(table.params.sum())}
    out = {"model": args.model, **total, "flops": 2 * total["macs"], "dense_macs": dense["macs"],
           "dense_params": dense["params"], "macs_ratio": total["macs"] / dense["macs"],
           "params_ratio": total["params"] / dense["params"]}
    if args.json:
        print(json.dumps(out))
        return
    by_comp = table.groupby("component", sort=False)[["macs", "params"]].sum()
    by_comp["macs_share"] = by_comp.macs / total["macs"]
    print(by_comp.to_string(formatters={"macs_share": "{:.1%}".format}))
    print(f"\n{args.model}: {total['macs']:,} MACs ({total['macs'] / 1e9:.3f} G), {total['params']:,} params"
          + (f"; {out['macs_ratio']:.3f} of dense MACs" if structure is not None else ""))


def cmd_bench(args) -> None:
    import torch
    from uvclab.prune.baselines import uniform_structure
    from uvclab.compare.throughput import compare_throughput
    from uvclab.vit.export import export_model
    from uvclab.vit.models import create_vit
    from uvclab.vit.structure import Structure
    torch.manual_seed(0)
    model = create_vit(args.model, **_model_kwargs(args)).eval()
    structure = Structure.load(args.structure) if args.structure else uniform_structure(model, args.macs_ratio,
                                                                                         args.layout)
    exported = export_model(model, structure, args.layout)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = compare_throughput(model, exported, batch_size=args.batch_size, rounds=args.rounds, runtime=args.runtime,
                             threads=args.threads)
    print(json.dumps(res.to_dict()) if args.json else res)


def cmd_export_onnx(args) -> None:
    from uvclab.compare.deploy import export_onnx, model_folder
    out = Path(args.out) if args.out else model_folder(args.run_dir) / "model.onnx"
    res = export_onnx(args.run_dir, out, batch_size=None if args.dynamic_batch else args.batch_size,
                      opset=args.opset, num_images=args.images, exporter=args.exporter)
    print(json.dumps({k: v for k, v in res.to_dict().items() if k != "metadata"}) if args.json else res)


def cmd_latency_table(args) -> None:
    import time
    import torch
    from uvclab.vit.latency_build import cache_path, latency_table
    from uvclab.vit.models import create_vit
    if args.model.endswith(".json"):  # a teacher card: its architecture
        from uvclab.engine.teacher import load_teacher
        model = load_teacher(args.model)
    else:
        torch.manual_seed(0)
        model = create_vit(args.model, **_model_kwargs(args))
    model = model.eval().to(args.device)
    t0 = time.time()
    t = latency_table(model, args.batch_size, args.threads, args.device, rebuild=args.rebuild,
                      progress=not args.json)
    took = time.time() - t0
    path = cache_path(t.key)
    if args.json:
        print(json.dumps({"path": str(path), "build_seconds": t.build_seconds, "seconds": took,
                          "dense_ms_predicted": t.predicted_dense_ms(t.key["depth"]), **t.to_dict()}))
        return
    k = t.key
    cached = took < 0.5 * t.build_seconds
    print(f"{k['model']} on {k['device']} ({k['device_type']}), torch {k['torch']}, {k['threads']} threads, batch "
          f"{k['batch_size']}, {k['tokens']} tokens, width {k['embed_dim']}")
    print(f"  table   {path}" + (" (cached)" if cached else ""))
    print(f"  built   in {t.build_seconds:.1f} s ({len(t.heads) * len(t.qk_widths) * len(t.v_widths)} attention "
          f"+ {len(t.mlp_widths)} MLP points)")
    full = t.attn_ms[-1][-1][-1]
    print(f"  block   attention {full:.3f} ms + MLP {t.mlp_ms[-1]:.3f} ms + overhead {t.block_overhead_ms:.3f} ms")
    c = t.calibration
    if "measured_ms" in c:
        print(f"  calibrated on {len(c['measured_ms'])} whole models: a running block = {c['scale']:.3f} x parts "
              f"{c['block_ms']:+.3f} ms")
    print(f"  model   fixed {t.fixed_ms:.3f} ms; dense predicted {t.predicted_dense_ms(k['depth']):.2f} ms, "
          f"measured {t.dense_ms:.2f} ms")
    from uvclab.uvc import UVCSettings, resolve_prune_dims
    from uvclab.vit.macs import vit_shape
    _, d = resolve_prune_dims(UVCSettings(prune_dims="auto"), t, vit_shape(model), "compact")
    per = d["time_per_mac"]
    print(f"  per MAC a block's time saved by cutting v dims {per['dims']:.2f}, a head {per['heads']:.2f}, MLP "
          f"neurons {per['neurons']:.2f}: uvc.prune_dims: auto {'prunes' if d['prune_dims'] else 'keeps whole'} v "
          f"dims (their ratio {d['dims_vs_other_cuts']:.2f} vs threshold {d['threshold']})")


def cmd_compress(args) -> None:
    from uvclab.engine.compress import compress
    from uvclab.engine.config import load_config
    from uvclab.ranks import rank
    from uvclab.paths import runs_dir
    cfg = load_config(args.config, args.overrides)
    method = "" if cfg.method == "uvc" else f"-{cfg.method}"
    out = Path(args.out) if args.out else runs_dir() / f"{cfg.dataset}{method}-{cfg.macs_ratio:g}-seed{cfg.seed}"
    report = compress(cfg, out, resume=args.resume)
    if rank() == 0:
        print(compress_summary(report, out))


def compress_summary(report: dict, out: Path) -> str:
    name = "UVC" if report["method"] == "uvc" else report["method"]
    kind = "latency" if report.get("budget_kind") == "latency" else "MACs"
    from uvclab.compare.runs import model_label
    built = model_label(report["model"]["name"], report["model"].get("kwargs"))
    return "\n".join([
        f"{name} on {report['dataset']} ({built}), budget {report['budget']:.2f} of dense {kind}",
        f"  MACs    {report['macs']:,} / {report['dense_macs']:,} = {report['macs_ratio']:.3f}",
        f"  params  {report['params']:,} / {report['dense_params']:,} = {report['params_ratio']:.3f}",
        f"  blocks  {report['blocks_kept']} of {report['depth']} kept",
        f"  top-1   {report['top1']:.2f} % on {_images(report, 'test_samples')} test images (teacher "
        f"{report['teacher_top1']:.2f} % on the same images)",
        f"  val     {report['val_top1']:.2f} % on {_images(report, 'val_samples')} validation images (the epoch "
        f"kept); {report['val_top1_before_finetune']:.2f} % before fine-tuning",
        f"  time    {report['seconds']:.0f} s;  run folder: {out}  (uvclab.load_pruned('{out / 'model'}'))",
        "  " + json.dumps({k: report[k] for k in ("top1", "teacher_top1", "macs_ratio", "params_ratio")}),
    ])


def _images(report: dict, key: str) -> str:
    n = report.get(key)
    return f"{n:,}" if isinstance(n, int) else "?"      # reports before uvclab 0.2 lack the sizes


def cmd_runs(args) -> None:
    from uvclab.compare.runs import runs_table
    from uvclab.paths import runs_dir
    df = runs_table(args.root)
    if args.json:
        records = df.astype(object).where(df.notna(), None).to_dict(orient="records")    # NaN -> null
        print(json.dumps(records, default=lambda x: x.item()))                             # numpy scalars
        return
    if not len(df):
        print(f"no finished runs under {args.root or runs_dir()}")
        return
    import pandas as pd
    fmt = lambda x, f: "-" if x is None or x != x else f.format(x)  # noqa: E731  (missing / NaN: "-")
    table = pd.DataFrame({"run": df.run, "method": df.method, "budget": [f"{fmt(b, '{:.2f}')} {k if k == k else 'macs'}"
                                                                     for b, k in zip(df.budget, df.budget_kind)],
                      "seed": [fmt(x, "{:.0f}") for x in df.seed], "top-1 %": [fmt(x, "{:.2f}") for x in df.top1],
                      "test imgs": [fmt(x, "{:,.0f}") for x in df.test_samples],
                      "MACs": [fmt(x, "{:.3f}") for x in df.macs_ratio],
                      "latency": [fmt(x, "{:.3f}") for x in df.latency_ratio_measured],
                      "time s": [fmt(x, "{:.0f}") for x in df.seconds]})
    print(table.to_string(index=False))
    print(f"{len(df)} runs under {args.root or runs_dir()}; MACs and latency: fraction of dense (latency: measured, "
          "latency budgets only); `uvclab show RUN` for one run")


def cmd_show(args) -> None:
    import pandas as pd
    from uvclab.compare.runs import run_details
    d = run_details(args.run_dir)
    if args.json:
        print(json.dumps(d))
        return
    r, s = d["report"], d["structure"]
    print(compress_summary(r, Path(d["path"])).split("\n  {")[0])   # the summary without its JSON line
    if r.get("latency_ratio_measured") is not None:
        print(f"  latency {r['latency_ratio_measured']:.3f} of dense measured ({r['latency_ms']:.2f} / "
              f"{r['dense_latency_ms']:.2f} ms, batch {r['latency_batch_size']}), {r['latency_ratio_predicted']:.3f} "
              "predicted")
    if s:
        H, Dh, M = s["num_heads"], s["head_dim"], s["mlp_hidden"]
        rows = [{"block": b["block"], "heads": f"{b['heads']}/{H}", "v dims": f"{b['v_dims']}/{H * Dh}",
                 "MLP neurons": f"{b['mlp']}/{M}", "skipped": b["skipped"] or "-"} for b in s["blocks"]]
        print("\nstructure (kept / dense, per block):\n" + pd.DataFrame(rows).to_string(index=False))
    print("\nfiles:\n" + "\n".join(f"  {Path(d['path']) / f}" for f in d["files"]))
    if d["figures"]:
        print("figures:\n" + "\n".join(f"  {Path(d['path']) / f}" for f in d["figures"]))
    print("\nreport.json:\n" + "\n".join(f"  {k}: {json.dumps(v)}" for k, v in r.items()))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uvclab", description="Compress Vision Transformers with UVC.")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(q):
        q.add_argument("model", help="timm model name, e.g. deit_tiny_patch16_224")
        q.add_argument("--img-size", type=int, help="input resolution (default: the model's)")
        q.add_argument("--num-classes", type=int, help="classifier outputs (default: the model's)")
        q.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                       help="extra timm kwarg, e.g. depth=6 or patch_size=8 (repeatable)")
        q.add_argument("--layout", default="compact", choices=["fused", "compact"],
                       help="exported attention layout (see uvclab.budget.head_widths)")
        q.add_argument("--structure", help="Structure JSON (from `uvclab compress`)")
        q.add_argument("--json", action="store_true", help="print one JSON object")

    q = sub.add_parser("macs", help="MACs and params of a model, dense or under a structure")
    model_args(q)
    q.set_defaults(func=cmd_macs)

    q = sub.add_parser("bench", help="measured throughput of dense vs exported model on this machine")
    model_args(q)
    q.add_argument("--macs-ratio", type=float, default=0.5, help="uniform-width structure at this budget "
                   "when no --structure is given")
    q.add_argument("--batch-size", type=int, default=32)
    q.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    q.add_argument("--runtime", default="torch", choices=["torch", "onnxruntime"],
                   help="time in PyTorch or in ONNX Runtime (CPU; needs the 'deploy' extra)")
    q.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    q.set_defaults(func=cmd_bench)

    q = sub.add_parser("export-onnx", help="write a run's exported model as ONNX, verified in ONNX Runtime")
    q.add_argument("run_dir", help="run folder of `uvclab compress` (or a folder written by save_pruned)")
    q.add_argument("--out", help="ONNX file (default: RUN_DIR/model/model.onnx)")
    q.add_argument("--dynamic-batch", action="store_true", help="any batch size (default: fixed --batch-size)")
    q.add_argument("--batch-size", type=int, default=1, help="the fixed batch size of the graph")
    q.add_argument("--opset", type=int, default=18, help="ONNX opset")
    q.add_argument("--exporter", default="auto", choices=["auto", "dynamo", "torchscript"],
                   help="torch.onnx exporter (auto: dynamo, TorchScript where dynamo fails)")
    q.add_argument("--images", type=int, default=16, help="test images the ONNX output is verified on")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(func=cmd_export_onnx)
    q = sub.add_parser("latency-table", help="measure (or show the cached) latency table of a model on this device")
    q.add_argument("model", help="timm model name (shrunk with --model-arg) or a teacher card .json")
    q.add_argument("--img-size", type=int, help="input resolution (default: the model's)")
    q.add_argument("--num-classes", type=int, help="classifier outputs (default: the model's)")
    q.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="extra timm kwarg (repeatable)")
    q.add_argument("--batch-size", type=int, default=64, help="the batch the latency is for")
    q.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    q.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    q.add_argument("--rebuild", action="store_true", help="measure again even when a cached table matches")
    q.add_argument("--json", action="store_true", help="print the table as one JSON object (no progress bar)")
    q.set_defaults(func=cmd_latency_table)

    q = sub.add_parser("compress", help="compress a model: search (UVC) or cut (a baseline) a structure under a "
                       "MACs budget, export, fine-tune")
    q.add_argument("config", nargs="?", help="YAML config (default: the embedded digits job)")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set macs_ratio=0.3 --set uvc.glr=0.05 --set method=NAME "
                        f"({' | '.join(STRATEGIES)}) (repeatable)")
    q.add_argument("--out", help="run folder (default: runs/<dataset>-<method>-<macs_ratio>-seed<seed>)")
    q.add_argument("--resume", nargs="?", const="yes", default="no", choices=["yes", "auto"],
                   help="continue the interrupted run in --out; `--resume auto`: continue if there is one, else "
                        "start (under torchrun a restart continues by itself)")
    q.set_defaults(func=cmd_compress)
    q = sub.add_parser("runs", help="one row per finished run folder: method, budget, seed, top-1 (test images), "
                       "MACs, latency, time")
    q.add_argument("root", nargs="?", help="folder searched at any depth (default: $UVCLAB_RUNS or ./runs)")
    q.add_argument("--json", action="store_true", help="print a JSON list, one object per run")
    q.set_defaults(func=cmd_runs)
    q = sub.add_parser("show", help="one run folder: its report, the structure per block, its files")
    q.add_argument("run_dir", help="a run folder of `uvclab compress`")
    q.add_argument("--json", action="store_true", help="print one JSON object (report, structure, files)")
    q.set_defaults(func=cmd_show)
    q = sub.add_parser("teacher", help="train a ViT teacher from scratch", add_help=False)
    q.set_defaults(func=None)
    return p


def build_teacher_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uvclab teacher", description="Train a ViT teacher from scratch; writes "
                                "OUT.safetensors and the card OUT.json. Every TeacherConfig field can be set "
                                "with --set (or in a YAML file); other --set keys are timm model kwargs.")
    p.add_argument("config", nargs="?", help="YAML file of TeacherConfig fields")
    p.add_argument("--model", help="timm ViT name (shrunk with --set), default deit_tiny_patch16_224")
    p.add_argument("--dataset", help="digits | fashion_mnist | cifar10 | cifar100 | imagefolder")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config field (--set epochs=40 --set lr=1e-3) or a model kwarg (--set embed_dim=96)")
    for flag, help_ in (("--epochs", "training epochs"), ("--batch-size", None), ("--lr", "peak AdamW lr"),
                        ("--weight-decay", None), ("--warmup-epochs", None), ("--label-smoothing", None),
                        ("--seed", "weights init, shuffling and augmentation"),
                        ("--split-seed", "fixes the train/val/test split"), ("--val-fraction", None),
                        ("--max-steps-per-epoch", "cap for timing probes"), ("--data-root", "dataset folder"),
                        ("--init", "continue from this teacher (card .json or weights); the architecture must match")):
        p.add_argument(flag, help=help_ or f"same as --set {flag[2:].replace('-', '_')}=...")
    p.add_argument("--no-augment", action="store_true", help="train without crop/flip augmentation")
    p.add_argument("--fp16", action="store_true", help="store the weights in float16")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the CPUs we may use; use 1 when other jobs share the CPUs: "
                        "oversubscribed OpenMP threads can run 10x slower)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (logs, background runs)")
    p.add_argument("--out", required=True, help="output stem: writes OUT.safetensors and OUT.json")
    return p


def teacher_cli(argv: Optional[list[str]] = None) -> dict:
    """`uvclab teacher ...`: parse arguments (flags are shorthands for --set), train, print the card summary."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_teacher_parser().parse_args(argv)
    flags = [f"{k}={v}" for k in ("model", "dataset", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs",
                                  "label_smoothing", "seed", "split_seed", "val_fraction", "max_steps_per_epoch",
                                  "data_root", "init") if (v := getattr(args, k)) is not None]
    flags += ["augment=false"] * args.no_augment + ["fp16=true"] * args.fp16
    import torch
    from tqdm.auto import tqdm
    from uvclab.engine.config import load_teacher_config
    from uvclab.engine.teacher import available_cpus, train_teacher
    cfg = load_teacher_config(args.config, flags + args.set)
    torch.set_num_threads(args.threads or available_cpus())
    card = train_teacher(cfg, args.out, progress=not args.no_progress, command="uvclab teacher " + shlex.join(argv),
                         log=tqdm.write)
    print(f"wrote {args.out}.safetensors and {args.out}.json: val_top1 {card['val_top1']:.2f}  "
          f"test_top1 {card['test_top1']:.2f}  ({card['train_time_s']:.0f}s)", flush=True)
    return card


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "teacher":
            teacher_cli(argv[1:])
            return 0
        args = build_parser().parse_args(argv)
        args.func(args)
    except Preempted as e:
        from uvclab.engine.loop import rank
        if rank() == 0:
            print(f"uvclab: {e}", file=sys.stderr, flush=True)
        return Preempted.exit_status
    except UvclabError as e:
        print(f"uvclab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("uvclab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
