"""The `uvclab` command line: a thin layer over the library.

  uvclab macs MODEL [--img-size N] [--num-classes K] [--structure FILE] [--layout L] [--json]
  uvclab bench MODEL [--macs-ratio R | --structure FILE] [--batch-size B] [--json]
  uvclab compress [CONFIG.yaml] [--set key=value ...] [--out DIR] [--resume]
  uvclab teacher --model NAME --dataset NAME ...
User mistakes (UvclabError) print one clear message, no traceback, exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from .errors import UvclabError


def _model_kwargs(args) -> dict:
    kw = {}
    if getattr(args, "img_size", None):
        kw["img_size"] = args.img_size
    if getattr(args, "num_classes", None) is not None:
        kw["num_classes"] = args.num_classes
    for item in getattr(args, "model_arg", None) or []:
        key, _, value = item.partition("=")
        try:
            kw[key] = json.loads(value)
        except json.JSONDecodeError:
            kw[key] = value
    return kw


def cmd_macs(args) -> None:
    from . import budget
    from .models import create_vit
    from .structure import Structure
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
    from .baselines import uniform_structure
    from .bench import compare_throughput
    from .export import export_model
    from .models import create_vit
    from .structure import Structure
    torch.manual_seed(0)
    model = create_vit(args.model, **_model_kwargs(args)).eval()
    structure = Structure.load(args.structure) if args.structure else uniform_structure(model, args.macs_ratio,
                                                                                         args.layout)
    exported = export_model(model, structure, args.layout)
    res = compare_throughput(model, exported, batch_size=args.batch_size, rounds=args.rounds)
    print(json.dumps(res.to_dict()) if args.json else res)


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
    q.set_defaults(func=cmd_bench)

    try:
        from .pipeline_cli import add_compress_parser
        add_compress_parser(sub)
    except ImportError:
        pass
    q = sub.add_parser("teacher", help="train a ViT teacher from scratch", add_help=False)
    q.set_defaults(func=None)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "teacher":
            from .teacher import teacher_cli
            teacher_cli(argv[1:])
            return 0
        args = build_parser().parse_args(argv)
        args.func(args)
    except UvclabError as e:
        print(f"uvclab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("uvclab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
