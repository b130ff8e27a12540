"""Running `spark eval`'s tasks: read the data, load the model once, run each task in turn
and gather one report (`eval.report` renders it; `eval.cli` parses the options).

Every task writes its results into the output directory as they come, so an interrupted
run resumes where it stopped; HumanEval generation also records its settings (run.json)
and refuses to mix samples made with other ones.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import time
from pathlib import Path
from typing import Any

from eval import context_curve, infill, line_completion, retrieval
from eval.bpb import BpbError, bits_per_byte, collect_files
from eval.generation import STOP_SEQUENCES, generate_samples, measure_latency
from eval.humaneval import DEFAULT_KS, evaluate_samples, load_problems, read_samples
from eval.sandbox import capabilities

SAMPLES_FILE = "samples.jsonl"
GENERATION_LOG = "generation.jsonl"
RUN_FILE = "run.json"
# Settings that change what a sample is; a resumed run must agree on all of them.
_GENERATION_KEYS = ("checkpoint", "weights", "chat", "temperature", "top_p", "max_new_tokens",
                    "seed")


class EvalError(Exception):
    """Input data or the environment prevents the evaluation (exit status 1)."""


def check_run_settings(out: Path, settings: dict) -> None:
    """Refuse to resume generation whose existing samples came from other settings."""
    path = out / RUN_FILE
    if path.exists():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise EvalError(f"{path} is not valid JSON; remove it or use another --out")
        previous.setdefault("chat", False)  # runs from before --chat existed
        changed = [k for k in _GENERATION_KEYS if previous.get(k) != settings.get(k)]
        if changed and (out / SAMPLES_FILE).exists():
            k = changed[0]
            raise EvalError(f"{out / SAMPLES_FILE} was generated with {k}={previous.get(k)!r}, "
                            f"not {settings.get(k)!r}; use another --out or the same settings")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def load_model(checkpoint: str | None, capacity: int | None = None,
               weights: str | None = None) -> Any:
    try:
        import spark_model
    except Exception as e:  # noqa: BLE001 - any import failure means "no model here"
        raise EvalError(f"cannot import spark_model to load a model: {e}") from e
    try:
        return spark_model.load(checkpoint, capacity=capacity, weights=weights)
    except Exception as e:  # noqa: BLE001 - missing files, bad hashes, config errors ...
        where = checkpoint or "the default checkpoint"
        raise EvalError(f"cannot load {where}: {e}") from e


def require_sandbox() -> dict:
    caps = capabilities()
    if not caps["available"]:
        raise EvalError(f"the sandbox cannot run programs here: {caps['error']}")
    return caps


def evaluate(args: argparse.Namespace, tasks: list[str]) -> dict:
    started = time.monotonic()
    out = Path(args.out)
    progress = not args.no_progress
    report: dict[str, Any] = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tasks": tasks, "model": None, "settings": {}, "humaneval": None, "bpb": None,
        "bpb_xz": None, "bpb_details": None, "ttft_s": None, "tokens_per_s": None,
        "generation": None,
        "sandbox": None, "infill": None, "line": None, "context": None, "retrieval": None,
    }
    if args.samples is not None:
        problems = load_problems()
        read_samples(args.samples, problems)  # fail fast, before any sandbox work
        report["sandbox"] = require_sandbox()
        report["settings"] = {"samples": str(Path(args.samples).resolve()), "limit": args.limit,
                              "timeout_s": args.timeout, "workers": args.workers}
        report["humaneval"] = evaluate_samples(args.samples, out, k=DEFAULT_KS,
                                               workers=args.workers, timeout_s=args.timeout,
                                               problems=problems, limit=args.limit,
                                               progress=progress)
        report["elapsed_s"] = round(time.monotonic() - started, 3)
        return report

    bpb_files: list = []
    if "bpb" in tasks and args.bpb_data:
        bpb_files = collect_files(args.bpb_data)
        if not bpb_files:
            raise BpbError("--bpb-data names no files (directories are searched for *.py)")
    elif "bpb" in tasks:
        # The training pipeline's held-out split of the stdlib: files never trained on.
        from train.corpus import validation_files

        bpb_files = validation_files()
        report["bpb_data"] = "held-out standard-library files (the training split's validation)"
    line_samples: list = []
    if "line" in tasks:  # read and cut the files before loading a model
        if args.line_data:
            files = collect_files(args.line_data)
            if not files:
                raise EvalError("--line-data names no files (directories are searched for *.py)")
            sources = {"data": files}
        else:
            sources = line_completion.default_sources()
        for name, files in sources.items():
            line_samples += line_completion.sample_lines(name, files, args.line_samples,
                                                         args.seed)
    sequences: dict[str, str] = {}
    if {"context", "retrieval"} & set(tasks):
        if args.context_data:
            for d in map(Path, args.context_data):
                if not d.is_dir():
                    raise EvalError(f"--context-data {d} is not a directory")
                sequences[d.name or str(d)] = context_curve.sequence_text(
                    sorted(d.rglob("*.py")), d.parent)
        else:
            sequences = context_curve.default_sources()
    problems = load_problems() if {"humaneval", "infill"} & set(tasks) else {}
    if {"humaneval", "infill"} & set(tasks):
        report["sandbox"] = require_sandbox()
    # A path is recorded absolute; a fetched model's name (smollm2-135m) as it is.
    checkpoint = (str(Path(args.checkpoint).resolve()) if args.checkpoint
                  and Path(args.checkpoint).exists() else args.checkpoint)
    settings = {"checkpoint": checkpoint, "weights": getattr(args, "weights", None),
                "chat": args.chat, "n": args.n, "temperature": args.temperature,
                "top_p": args.top_p, "max_new_tokens": args.max_new_tokens,
                "seed": args.seed, "limit": args.limit, "batch_size": args.batch_size,
                "timeout_s": args.timeout, "workers": args.workers}
    report["settings"] = dict(settings)
    if "humaneval" not in tasks:  # sampling settings apply to HumanEval only
        for key in ("chat", "n", "temperature", "top_p", "max_new_tokens"):
            del report["settings"][key]
    if "infill" in tasks:
        report["settings"]["infill_mode"] = args.infill_mode
    if "line" in tasks:
        report["settings"].update(line_context=args.line_context,
                                  line_samples=args.line_samples, line_data=args.line_data)
    if "context" in tasks:
        report["settings"].update(context_lengths=args.context_lengths_list,
                                  context_target=args.context_target)
    if {"context", "retrieval"} & set(tasks):
        report["settings"]["context_data"] = args.context_data or "default"
    if "retrieval" in tasks:
        report["settings"].update(retrieval_lengths=args.retrieval_lengths_list,
                                  retrieval_depths=args.retrieval_depths_list,
                                  retrieval_trials=args.retrieval_trials)
    if "humaneval" in tasks:
        check_run_settings(out, settings)
    weights = getattr(args, "weights", None)
    model = (load_model(args.checkpoint, args.capacity, weights) if weights
             else load_model(args.checkpoint, args.capacity))
    report["model"] = {"checkpoint": str(getattr(model, "path", None) or checkpoint),
                       "description": repr(model)}
    if "humaneval" in tasks:
        chosen = dict(list(problems.items())[:args.limit] if args.limit else problems.items())
        if args.chat:
            from eval.chat_mode import ChatHumanEval

            generator, stop = ChatHumanEval(model), ()  # the reply ends at its end-of-turn id
        else:
            generator, stop = model, STOP_SEQUENCES
        stats = generate_samples(generator, chosen, out / SAMPLES_FILE, n=args.n, stop=stop,
                                 temperature=args.temperature, top_p=args.top_p,
                                 max_new_tokens=args.max_new_tokens, seed=args.seed,
                                 batch_size=args.batch_size, log_path=out / GENERATION_LOG,
                                 progress=progress)
        report["generation"] = stats.to_dict()
        report["ttft_s"], report["tokens_per_s"] = stats.ttft_s, stats.tokens_per_s
        # Batch-1 latency on the first prompt: what a user waiting on one completion sees.
        latency = measure_latency(model, next(iter(chosen.values()))["prompt"])
        if latency:
            report["latency_batch1"] = latency
            report["ttft_s"] = latency.get("ttft_s", report["ttft_s"])
            report["tokens_per_s"] = latency.get("tokens_per_s", report["tokens_per_s"])
        report["humaneval"] = evaluate_samples(out / SAMPLES_FILE, out, k=DEFAULT_KS,
                                               workers=args.workers, timeout_s=args.timeout,
                                               problems=problems, limit=args.limit,
                                               progress=progress)
    model_id = report["model"]["checkpoint"]
    if "infill" in tasks:
        chosen = dict(list(problems.items())[:args.limit] if args.limit else problems.items())
        mode = infill.resolve_mode(model, args.infill_mode)
        report["infill"] = infill.run(model, infill.build_tasks(chosen), chosen, out,
                                      mode=mode, model_id=model_id, workers=args.workers,
                                      timeout_s=args.timeout, batch_size=args.batch_size,
                                      progress=progress)
    if "line" in tasks:
        report["line"] = line_completion.run(model, line_samples, out, model_id=model_id,
                                             context=args.line_context,
                                             batch_size=args.batch_size, progress=progress)
    if "context" in tasks:
        report["context"] = context_curve.run(model, sequences, out, model_id=model_id,
                                              lengths=args.context_lengths_list,
                                              target_bytes=args.context_target,
                                              progress=progress)
        report["context"]["plot"] = str(context_curve.plot(report["context"],
                                                           out / "context.png"))
    if "retrieval" in tasks:
        haystack_name, code = next(iter(sequences.items()))
        report["retrieval"] = retrieval.run(model, code, out, model_id=model_id,
                                            lengths=args.retrieval_lengths_list,
                                            depths=args.retrieval_depths_list,
                                            trials=args.retrieval_trials, seed=args.seed,
                                            progress=progress)
        report["retrieval"]["haystack"] = haystack_name
        report["retrieval"]["plot"] = str(retrieval.plot(report["retrieval"],
                                                         out / "retrieval.png"))
    if "bpb" in tasks:
        details = bits_per_byte(model, bpb_files, seq_len=args.bpb_seq_len,
                                progress=progress)
        report["bpb"], report["bpb_details"] = details["bits_per_byte"], details
        from eval.xz_baseline import xz_bits_per_byte
        report["bpb_xz"] = xz_bits_per_byte(bpb_files)
    report["elapsed_s"] = round(time.monotonic() - started, 3)
    return report
