"""`spark train`: train a model on a code corpus; the run directory becomes a checkpoint.

    spark train --preset tiny --out runs/tiny [--steps N] [--resume] [--data PATH ...]
    spark train --init MODEL --data DIR --out runs/ft [--lora RANK] [--steps N]

`add_arguments(parser)` declares the options and `run(args) -> int` runs them; `main(argv)`
does both (``python -m train ...``). Exit codes: 0 done, 1 a runtime error (bad data, a
checkpoint that does not match, ...), 2 a usage error; each error is one line on stderr.

When resuming, options that are not given are taken from the run being resumed; options
that are given must agree with it, except the ones that do not change the result
(--grad-accum, --fsdp, --log-every, --eval-every, --eval-tokens, --save-every, --keep,
--cache-dir, --progress), and --steps, which may grow: that extends a run, the cosine
schedule being recomputed over the new total from the resumed step on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from spark_model.cli import Command

PROG = "spark train"

# option -> (TrainConfig field, type); every option defaults to None so that a resumed run
# can tell what the user actually typed.
_OPTIONS = {
    "steps": int, "batch_size": int, "seq_len": int, "lr": float, "min_lr_ratio": float,
    "warmup": int, "weight_decay": float, "clip": float, "seed": int, "vocab_size": int,
    "grad_accum": int, "log_every": int, "eval_every": int, "eval_tokens": int,
    "save_every": int, "keep": int, "val_permille": int, "line_samples": int,
    "target_context": int, "pose_share": float, "pose_chunks": int,
}
_OPTIONS["fim_rate"] = float
_OPTIONS["fim_lines"] = float


def _context(text: str) -> int:
    """A context length: a whole number of tokens, or of 1,024 tokens with a K suffix
    (128K = 131,072)."""
    t = text.strip()
    scale = 1024 if t[-1:] in ("k", "K") else 1
    try:
        n = int(t[:-1] if scale > 1 else t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected tokens such as 131072 or 128K, "
                                         f"got {text!r}") from None
    return n


FINETUNE_LR = 1e-4  # default peak learning rate with --init (every weight trains)
LORA_LR = 1e-3  # ... and with --lora (adapters start at zero and need larger steps)
FINETUNE_LINES = 100  # held-out next-line completions scored before and after, with --init
FIM_RATE_WITH_NEW_TOKENS = 0.5  # default --fim-rate with --add-fim-tokens


class UsageError(ValueError):
    """Bad command-line input (exit code 2)."""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from train.config import TrainConfig

    d = TrainConfig()
    g = parser.add_argument_group("run")
    g.add_argument("--out", required=True, metavar="DIR",
                   help="run directory: training state, metrics, and the trained model as a "
                        "checkpoint (spark_model.load(DIR))")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint; with a larger "
                        "--steps, extend it (the cosine decays over the new total)")
    g.add_argument("--preset", default=None, help=f"model preset (default: {d.preset})")
    g.add_argument("--init", default=None, metavar="MODEL",
                   help="fine-tune this model instead of training a preset from scratch: a "
                        "Spark checkpoint, a .gguf file, a Hugging Face directory or a "
                        "fetched model's name; its config and tokenizer are kept, and "
                        "held-out bits per byte are reported before and after")
    g.add_argument("--lora", type=int, default=None, metavar="RANK",
                   help="with --init: train low-rank adapters of this rank on the attention "
                        "and MLP products (merged into the weights of the exported model) "
                        "instead of every weight")
    g.add_argument("--lora-alpha", type=float, default=None,
                   help="adapter scale alpha / RANK (default alpha: 2 * RANK)")
    g.add_argument("--add-fim-tokens", action="store_true", default=None,
                   help="with --init (a SentencePiece model without them): append the "
                        "fill-in-the-middle control pieces <fim_prefix> <fim_suffix> "
                        "<fim_middle> to its vocabulary, their embedding rows starting at the "
                        "mean embedding; the run saves and exports the extended tokenizer")
    g.add_argument("--fim-rate", type=float, default=None, metavar="RATE",
                   help="share of training documents rearranged into fill-in-the-middle "
                        "examples, half prefix-suffix-middle and half suffix-prefix-middle "
                        "(default 0; with --add-fim-tokens "
                        f"{FIM_RATE_WITH_NEW_TOKENS}); needs a vocabulary with FIM tokens")
    g.add_argument("--fim-lines", type=float, default=None, metavar="SHARE",
                   help="share of the rearranged documents cut at line starts, the middle "
                        "1 to 8 whole lines, as an editor's line completions are (default 0: "
                        "cuts at any character)")
    g.add_argument("--set", dest="overrides", action="append", default=None,
                   metavar="FIELD=VALUE",
                   help="override a model config field, e.g. --set n_layers=2 (repeatable)")
    g.add_argument("--data", nargs="+", action="extend", default=None, metavar="SOURCE",
                   help="stdlib (the Python standard library), site-packages (the Python "
                        "code of this project's installed dependencies), directories (all "
                        ".py files under them), .jsonl files (a \"text\" or \"content\" "
                        "field per line) or files; default: stdlib")
    g.add_argument("--repo-order", action=argparse.BooleanOptionalAction, default=None,
                   help="pack the training documents package by package, each module before "
                        "the modules that import it (default for new runs; runs started "
                        "before this option keep the corpus order)")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="tokenizer vocabulary (default: the preset's)")
    g.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="token and tokenizer cache (default: $SPARK_CACHE_DIR or "
                        "~/.cache/spark)")
    o = parser.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {d.steps})")
    o.add_argument("--batch-size", type=int, default=None,
                   help=f"sequences per optimizer step, over all devices (default {d.batch_size})")
    o.add_argument("--seq-len", type=int, default=None,
                   help=f"tokens per training sequence (default {d.seq_len})")
    o.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default {d.lr}; with --init {FINETUNE_LR}, "
                        f"with --lora {LORA_LR})")
    o.add_argument("--min-lr-ratio", type=float, default=None,
                   help=f"final lr as a fraction of --lr (default {d.min_lr_ratio})")
    o.add_argument("--warmup", type=int, default=None,
                   help=f"linear warmup steps (default {d.warmup}, at most a tenth of --steps)")
    o.add_argument("--weight-decay", type=float, default=None,
                   help=f"AdamW weight decay on matrices (default {d.weight_decay})")
    o.add_argument("--clip", type=float, default=None,
                   help=f"gradient clipping global norm (default {d.clip})")
    o.add_argument("--target-context", type=_context, default=None, metavar="N",
                   help="PoSE: give training sequences position ids spread over [0, N) "
                        "(e.g. 128K) so the model learns distances up to N at the cost of "
                        "--seq-len tokens (default: plain positions 0 .. seq-len - 1)")
    o.add_argument("--pose-share", type=float, default=None, metavar="P",
                   help=f"with --target-context: share of sequences given position skips, "
                        f"the rest stay contiguous (default {d.pose_share})")
    o.add_argument("--pose-chunks", type=int, default=None, metavar="N",
                   help=f"with --target-context: chunks per skipped sequence (default "
                        f"{d.pose_chunks})")
    o.add_argument("--grad-accum", type=int, default=None,
                   help="split each step's batch into this many micro-batches (default 1)")
    o.add_argument("--seed", type=int, default=None, help="init and data-order seed (default 0)")
    o.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 compute with f32 master weights (default: f32; on CPU bf16 "
                        "is slower)")
    o.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None,
                   help="shard parameters and optimizer state over the devices (default: "
                        "replicate them)")
    o.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                   help="on a CPU-only host, run N XLA CPU devices (data parallel over the "
                        "cores) instead of one multi-threaded device; on 2 cores this measured "
                        "~25%% slower than the default, but it exercises the sharded path")
    o.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first and run the same "
                        "command on every host (SLURM, Open MPI and Kubernetes settings are "
                        "detected; otherwise give the three options below)")
    o.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="with --distributed: address of process 0 (or $JAX_COORDINATOR_ADDRESS)")
    o.add_argument("--num-processes", type=int, default=None,
                   help="with --distributed: number of processes (hosts) (or "
                        "$JAX_NUM_PROCESSES)")
    o.add_argument("--process-id", type=int, default=None,
                   help="with --distributed: this process's index, 0 .. num-processes - 1 "
                        "(or $JAX_PROCESS_ID)")
    o.add_argument("--distributed-timeout", type=int, default=None, metavar="SECONDS",
                   help="with --distributed: how long to wait for every process to join "
                        "before failing (default 60)")
    m = parser.add_argument_group("monitoring")
    m.add_argument("--log-every", type=int, default=None,
                   help=f"steps per metrics line (default {d.log_every})")
    m.add_argument("--eval-every", type=int, default=None,
                   help=f"steps between validation evals, 0 = end only (default "
                        f"{d.eval_every}, at most a fifth of --steps)")
    m.add_argument("--eval-tokens", type=int, default=None,
                   help="validation tokens scored at each interval, whole files from a fixed "
                        f"subset (default {d.eval_tokens}); the full split is scored at the end")
    m.add_argument("--val-permille", type=int, default=None,
                   help=f"validation share of files in 1/1000 (default {d.val_permille})")
    m.add_argument("--save-every", type=int, default=None,
                   help=f"steps between checkpoints, 0 = end only (default {d.save_every}, "
                        "at most a quarter of --steps)")
    m.add_argument("--line-samples", type=int, default=None, metavar="N",
                   help="next-line completions cut from the held-out files, scored before "
                        "the first step and after the last (default: 100 with --init, else 0)")
    m.add_argument("--keep", type=int, default=None,
                   help=f"checkpoints kept (default {d.keep})")
    m.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default: when stderr is a terminal)")
    return parser


def _parse_overrides(items: list[str]) -> tuple[tuple[str, object], ...]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return tuple(sorted(out.items()))


def settings_from_args(args: argparse.Namespace, stored: dict | None = None):
    """The TrainConfig the command asks for: explicit options over the resumed run's
    settings (if any) over the defaults."""
    import dataclasses

    from train.config import TrainConfig

    base = TrainConfig.from_json_dict(stored) if stored else TrainConfig()
    given: dict = {}
    for name in _OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            given[name] = value
    if args.preset is not None:
        given["preset"] = args.preset
    if args.init is not None:
        if args.preset is not None:
            raise UsageError("--preset and --init exclude each other: --init keeps the "
                             "model's own config")
        from train.init import resolve_source
        given["init"] = resolve_source(args.init)
    if args.lora is not None:
        if args.lora < 1:
            raise UsageError(f"--lora must be a rank of at least 1, got {args.lora}")
        given["lora_rank"] = args.lora
    if args.lora_alpha is not None:
        given["lora_alpha"] = args.lora_alpha
    if getattr(args, "add_fim_tokens", None):
        given["add_fim_tokens"] = True
    if args.overrides is not None:
        given["overrides"] = _parse_overrides(args.overrides)
    if args.data is not None:
        from train.corpus import NAMED_SOURCES
        given["data"] = tuple(p if p in NAMED_SOURCES else str(Path(p).expanduser().absolute())
                              for p in args.data)
    for flag in ("bf16", "fsdp", "repo_order"):
        if getattr(args, flag, None) is not None:
            given[flag] = bool(getattr(args, flag))
    if not stored:
        # Defaults that fit any run length: warmup at most a tenth of the steps, evals at
        # most a fifth, checkpoints at most a quarter; fine-tuning starts gentler.
        steps = given.get("steps", base.steps)
        scaled = {"warmup": min(base.warmup, steps // 10),
                  "eval_every": min(base.eval_every, max(1, steps // 5)),
                  "save_every": min(base.save_every, max(1, steps // 4))}
        if "init" in given:
            scaled["lr"] = LORA_LR if given.get("lora_rank") else FINETUNE_LR
            scaled["line_samples"] = FINETUNE_LINES
        scaled["repo_order"] = True  # new runs: packages whole, imports first
        if given.get("add_fim_tokens"):
            scaled["fim_rate"] = FIM_RATE_WITH_NEW_TOKENS
        for name, value in scaled.items():
            given.setdefault(name, value)
    return dataclasses.replace(base, **given)


def run(args: argparse.Namespace) -> int:
    """Run `spark train` with parsed arguments; returns the exit code."""
    from spark_model.config import ConfigError
    from train.corpus import CorpusError
    from train.data import DataError
    from train.config import SettingsError, TrainError

    try:
        launch_opts = (args.coordinator, args.num_processes, args.process_id,
                       args.distributed_timeout)
        if args.distributed:  # first: it must come before JAX starts its backend
            from train import launch
            launch.initialize(launch.resolve(*launch_opts))
        elif launch_opts != (None, None, None, None):
            raise UsageError("--coordinator, --num-processes, --process-id and "
                             "--distributed-timeout need --distributed")
        if args.cpu_devices is not None:
            _set_cpu_devices(args.cpu_devices)
        from train.loop import train
        from train.rundir import RUN_DIR, RUN_FILE

        out = Path(args.out).expanduser()
        stored = None
        if args.resume and (out / RUN_DIR / RUN_FILE).is_file():
            try:
                stored = json.loads((out / RUN_DIR / RUN_FILE).read_text())["settings"]
            except (ValueError, KeyError, TypeError):
                stored = None  # train() reports the damaged file
        tc = settings_from_args(args, stored)
        train(tc, out, resume=args.resume, cache_dir=args.cache_dir, progress=args.progress)
        return 0
    except (UsageError, SettingsError, ConfigError) as e:
        return _fail(e, 2)
    except (TrainError, CorpusError, DataError, ValueError, OSError) as e:
        return _fail(e, 1)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; resume with --resume", file=sys.stderr)
        return 130


def _set_cpu_devices(n: int) -> None:
    import jax

    if n < 1:
        raise UsageError(f"--cpu-devices must be at least 1, got {n}")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except Exception as e:  # noqa: BLE001 - raised when the backend already started
        raise UsageError(f"--cpu-devices: too late to set the CPU device count ({e})") from None
    if jax.default_backend() == "cpu" and len(jax.local_devices()) != n:
        raise UsageError(f"--cpu-devices {n}: JAX started with {len(jax.local_devices())} CPU "
                         "device(s); set it before anything else uses JAX")


def _fail(e: BaseException, code: int) -> int:
    if os.environ.get("SPARK_DEBUG"):
        raise e
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return code


command = Command("train a model on a code corpus (default: the stdlib)", add_arguments, run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Train a model on a code corpus.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
