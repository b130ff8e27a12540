"""`spark bench decode|serve|latency|compile|import`: the speed benchmarks, one subcommand.

decode: the engine against its roofline and its peers, llama.cpp and transformers
(`eval.bench_decode`, `--weights` for packed formats); serve: the server's overhead, TTFT
and throughput under load (`eval.bench_serve`); latency: prefix reuse and infilling round
trips, section by section (`eval.bench_latency`); compile: compile times of tiny, llama3-8b
and llama3-70b (`eval.bench_compile`). Each is imported only when it runs.
"""

from __future__ import annotations

import argparse

from spark_model.cli import Command


def add_arguments(bench: argparse.ArgumentParser) -> None:
    bench.add_argument("what", choices=["decode", "compile", "serve", "latency", "import"],
                       help="decode: the engine against its roofline and the peer; "
                            "latency: time to first token with a reused prefix, and /infill "
                            "round trips; "
                            "import: an imported model against llama.cpp and transformers "
                            "on the same float32 weights; "
                            "serve: the server's overhead, TTFT and throughput under load; "
                            "compile: compile times of tiny, llama3-8b and llama3-70b")
    bench.add_argument("--checkpoint", "--model", metavar="MODEL", default=None,
                       help="checkpoint directory, GGUF file, Hugging Face directory or "
                            "fetched model name (default: the shipped checkpoint)")
    bench.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    bench.add_argument("--runs", type=int, default=5, help="timed runs per figure (best kept)")
    bench.add_argument("--no-peer", action="store_true",
                       help="decode: skip the llama.cpp and Hugging Face transformers peers")
    bench.add_argument("--weights", metavar="FORMAT", default=None,
                       choices=["f32", "q8_0", "q4_0", "q4_1"],
                       help="decode: run the model's weight matrices in this format (a GGUF "
                            "file of that type runs as stored; default: as the model holds "
                            "them)")
    bench.add_argument("--max-batch", type=int, default=8, metavar="N",
                       help="serve: the server's batch slots (default 8)")
    bench.add_argument("--sections", metavar="NAMES", default=None,
                       help="latency: comma-separated sections (default all: edit_workload, "
                            "fresh_code, prefix_reuse, infill)")


def run(args: argparse.Namespace) -> int:
    if args.what == "decode":
        from eval import bench_decode

        return bench_decode.main(args.checkpoint, args.json, args.runs, not args.no_peer,
                                 args.weights)
    if args.what == "import":
        from eval import bench_import

        if args.checkpoint is None:
            raise SystemExit("spark bench import needs --model (a GGUF file, a Hugging Face "
                             "directory or a fetched model name)")
        return bench_import.main(args.checkpoint, args.json)
    if args.what == "serve":
        from eval import bench_serve

        return bench_serve.main(args.checkpoint, args.json, args.max_batch)
    if args.what == "latency":
        from eval import bench_latency

        sections = args.sections.split(",") if args.sections else None
        models = None if args.checkpoint is None else [args.checkpoint]
        return bench_latency.main(models, args.json, args.runs, sections)
    from eval import bench_compile

    return bench_compile.main(args.json)


command = Command("run a speed benchmark (decode, serve, latency, import or compile)",
                  add_arguments, run)
