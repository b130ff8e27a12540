"""`spark compile`: map a model onto a wafer-scale target and print what it takes.

    spark compile (--preset NAME | --checkpoint DIR) --target NAME [--context N]
                  [--wafers N] [--weights FORMAT] [--print-ir] [--verify] [--explain]
                  [--report DIR] [--json] [--verify-rows K --acceptance A [--draft-us US]]

`--weights` stores the matrices as f32, bf16 or the packed q8_0, q4_0, q4_1 (tiles of
whole 32-weight blocks with their scales; default: the model's parameter dtype).
`--verify` runs the placed program on the model's weights and compares its logits with
the model's own decode step (it needs real weights: a checkpoint or an imported model);
with `--weights`, both run on the weights as that format stores them (quantized, then
dequantized).
`--verify-rows K --acceptance A` adds the predicted cost of a speculative verify step of K
rows (compiler.speculate) and the tokens/s it gives when each draft is accepted with
probability A; with `--verify` the placed program also runs K-row steps against the model.
"""

from __future__ import annotations

import argparse
import json
import sys

from compiler.ir import WEIGHT_FORMATS
from spark_model.cli import Command
from spark_model.config import PRESETS


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=sorted(PRESETS), help="a model preset (shapes only)")
    src.add_argument("--checkpoint", "--model", dest="checkpoint", metavar="MODEL",
                     help="a checkpoint directory, GGUF file, Hugging Face directory or "
                          "fetched model name")
    p.add_argument("--target", default="wse3",
                   help="wse2, wse3 or grid:ROWSxCOLS[:MEM] such as grid:64x64:48KB "
                        "(default: wse3)")
    p.add_argument("--context", type=int, default=None,
                   help="KV cache positions to reserve (default: the model's max_seq_len, "
                        "at most 131072)")
    p.add_argument("--wafers", type=int, default=None,
                   help="wafers that may be used (default: the target's, 1 for presets)")
    p.add_argument("--weights", choices=WEIGHT_FORMATS, default=None, metavar="FORMAT",
                   help="how the matrices are stored on the cores: "
                        f"{', '.join(WEIGHT_FORMATS)} (packed formats in whole 32-weight "
                        "blocks with their scales; default: the model's parameter dtype)")
    p.add_argument("--seed", type=int, default=0, help="seed of the placement refinement")
    p.add_argument("--layers-per-region", type=int, default=None, metavar="N",
                   help="force the planner's mapping: N layers per set of regions, 0 for "
                        "every op over the whole wafer (default: the fastest)")
    p.add_argument("--print-ir", action="store_true", help="print the operator graph")
    p.add_argument("--verify", action="store_true",
                   help="run the placed program and compare its logits with the model's")
    p.add_argument("--explain", action="store_true",
                   help="list the planner's best alternatives with their predictions")
    p.add_argument("--report", metavar="DIR",
                   help="write plan.json, pictures (PNG), a decode-step trace and report.md")
    p.add_argument("--verify-rows", type=int, default=None, metavar="K",
                   help="also predict a speculative verify step of K rows (1-8: the last "
                        "token and K-1 drafts) and the tokens/s it gives at --acceptance")
    p.add_argument("--acceptance", type=float, default=None, metavar="A",
                   help="with --verify-rows: probability in [0, 1] that the model accepts "
                        "a draft")
    p.add_argument("--draft-us", type=float, default=0.0, metavar="US",
                   help="with --verify-rows: microseconds to draft per step (default 0, "
                        "as for prompt lookup)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _speculation_error(args: argparse.Namespace) -> str | None:
    """The first problem with --verify-rows / --acceptance / --draft-us, or None."""
    from compiler.speculate import MAX_ROWS

    if args.verify_rows is None:
        if args.acceptance is not None or args.draft_us:
            return "--acceptance and --draft-us need --verify-rows K"
        return None
    if not 1 <= args.verify_rows <= MAX_ROWS:
        return f"--verify-rows must be from 1 to {MAX_ROWS}, got {args.verify_rows}"
    if args.acceptance is None:
        return "--verify-rows needs --acceptance A (a probability in [0, 1])"
    if not 0.0 <= args.acceptance <= 1.0:
        return f"--acceptance must be in [0, 1], got {args.acceptance}"
    if not 0.0 <= args.draft_us < float("inf"):
        return f"--draft-us must be >= 0, got {args.draft_us}"
    return None


def run(args: argparse.Namespace) -> int:
    import compiler

    if args.verify and not args.checkpoint:
        print("spark compile: error: --verify needs real weights: pass --checkpoint DIR",
              file=sys.stderr)
        return 2
    bad = _speculation_error(args)
    if bad:
        print(f"spark compile: error: {bad}", file=sys.stderr)
        return 2
    if args.wafers is not None and args.wafers < 1:
        print(f"spark compile: error: --wafers must be >= 1, got {args.wafers}", file=sys.stderr)
        return 2
    model = None
    imported = False  # a GGUF file or Hugging Face directory: its config comes with weights
    if args.checkpoint:
        from spark_model.formats import detect

        try:
            imported = detect.detect(detect.resolve(args.checkpoint)) != "checkpoint"
        except (ValueError, OSError) as e:
            print(f"spark compile: error: {e}", file=sys.stderr)
            return 1
    if args.verify or imported:
        # Load first: the plan is compiled from the very model it is checked on.
        import spark_model

        # Float weights: the plan's own --weights says how the cores store them (a GGUF
        # file's packed blocks would otherwise stay packed in the model).
        model = spark_model.load(args.checkpoint, weights="f32")  # no cache is allocated
    try:
        plan = compiler.compile(model or args.checkpoint or args.preset, args.target,
                                args.context, wafers=args.wafers, seed=args.seed,
                                layers_per_region=args.layers_per_region,
                                weights=args.weights)
    except (compiler.CompilerError, compiler.TargetError) as e:
        print(f"spark compile: error: {e}", file=sys.stderr)
        return 1
    from compiler.summary import explain, format_summary, summary as summarize

    summary = summarize(plan)
    if args.verify:
        from compiler.verify import DEFAULT_PROMPT, logit_diffs

        ids = model.tokenizer.encode(DEFAULT_PROMPT)
        diffs = logit_diffs(plan, model, ids, capacity=min(2048, model.config.max_seq_len))
        summary["verified_positions"] = len(diffs)
        summary["max_abs_logit_diff"] = max(diffs)
        if args.verify_rows is not None:
            from compiler.verify import verify_step_diffs

            rdiffs = verify_step_diffs(plan, model, ids, args.verify_rows,
                                       capacity=min(2048, model.config.max_seq_len))
            summary["verified_steps"] = len(rdiffs)
            summary["max_abs_logit_diff_verify_rows"] = max(rdiffs)
    if args.verify_rows is not None:
        from compiler.speculate import format_speculation, speculation

        try:
            spec = speculation(plan, args.verify_rows, args.acceptance, args.draft_us * 1e-6)
        except compiler.CompilerError as e:
            print(f"spark compile: error: {e}", file=sys.stderr)
            return 1
        summary["speculation"] = spec
    if args.report:
        from compiler.report import write_report

        summary["report"] = str(write_report(plan, args.report))
    if args.json:
        if args.print_ir:
            summary["ir"] = [{"name": o.name, "kind": o.kind, "layer": o.layer,
                              "detail": o.describe()} for o in plan.graph.ops]
        print(json.dumps(summary, indent=2))
        return 0
    if args.print_ir:
        print(compiler.format_graph(plan.graph))
        print()
    print(format_summary(plan))
    if args.verify_rows is not None:
        print(format_speculation(summary["speculation"]))
    if args.explain:
        print(explain(plan))
    if args.report:
        print(f"  report          {summary['report']}/report.md (plan.json, sram.png, "
              "regions.png, links.png, trace.json)")
    if args.verify:
        print(f"  verified        {summary['verified_positions']} positions: max |logit "
              f"difference| {summary['max_abs_logit_diff']:.3g} against the model's decode step"
              f" (weights as {plan.weights} stores them)")
        if args.verify_rows is not None:
            print(f"  verified        {summary['verified_steps']} steps of up to "
                  f"{args.verify_rows} rows: max |logit difference| "
                  f"{summary['max_abs_logit_diff_verify_rows']:.3g} against the model's own "
                  "forward over the same tokens")
    return 0


command = Command("map a model onto a wafer-scale core grid", add_arguments, run)
