"""`uvclab compress`: the CLI face of `train.compress` (config file + --set overrides, progress, summary)."""
from __future__ import annotations

import json
from pathlib import Path


def add_compress_parser(sub) -> None:
    q = sub.add_parser("compress", help="run UVC: search a structure under a MACs budget, export, fine-tune")
    q.add_argument("config", nargs="?", help="YAML config (default: the embedded digits job)")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set macs_ratio=0.3 --set uvc.glr=0.05 (repeatable)")
    q.add_argument("--out", help="run folder (default: runs/<dataset>-<macs_ratio>-seed<seed>)")
    q.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    q.set_defaults(func=cmd_compress)


def cmd_compress(args) -> None:
    from .config import load_config
    from .paths import runs_dir
    from .train import compress, rank
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else runs_dir() / f"{cfg.dataset}-{cfg.macs_ratio:g}-seed{cfg.seed}"
    report = compress(cfg, out, resume=args.resume)
    if rank() == 0:
        print(summary(report, out))


def summary(report: dict, out: Path) -> str:
    return "\n".join([
        f"UVC on {report['dataset']} ({report['model']['name']}), budget {report['macs_ratio_target']:.2f} of dense MACs",
        f"  MACs    {report['macs']:,} / {report['dense_macs']:,} = {report['macs_ratio']:.3f}",
        f"  params  {report['params']:,} / {report['dense_params']:,} = {report['params_ratio']:.3f}",
        f"  blocks  {report['blocks_kept']} of {report['depth']} kept",
        f"  top-1   {report['top1']:.2f} % (teacher {report['teacher_top1']:.2f} %), chosen on validation "
        f"({report['val_top1']:.2f} %)",
        f"  time    {report['seconds']:.0f} s;  run folder: {out}  (uvclab.load_pruned('{out / 'model'}'))",
        "  " + json.dumps({k: report[k] for k in ("top1", "teacher_top1", "macs_ratio", "params_ratio")}),
    ])
