"""Exported models run by other engines: `python -m eval.bench_export MODEL [MODEL...]`.

Each model is exported with `spark_model.formats.export` at float32, as a GGUF file run by
llama.cpp (`llama-cpp-python`) and as a Hugging Face directory run by `transformers`.
Measured, per engine:

* greedy decoding: the prompt's ids are fed to the engine directly and 128 new tokens
  chosen by argmax of its logits, compared with Spark's own greedy tokens (all identical,
  or the first position that differs), plus the largest logit difference over every
  position of prompt + continuation (`eval.bench_import`'s peers);
* tokenization: the engine's own tokenizer, read from the exported files, against
  Spark's on held-out standard-library files (files whose ids are identical) and on a
  handful of tricky strings.

Both engines are optional (`pip install -e '.[bench]'`); a missing one is reported.
A benchmark, not a test: it needs the engines and minutes of CPU.
"""

from __future__ import annotations

import json
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from eval import bench_import
from eval.sources import default_code

TRICKY = ["", "x", "  two  spaces", "\tTab\n\n    indent", "héllo wörld 日本語 😀",
          "3.14159 1,000,000", "it's they'll", "a\u2581marker", "<|im_end|> </s> <s>",
          "def f(a, *b, **c):\n    return {'k': [1, 2]}\n"]


def _texts(n_files: int) -> list[str]:
    files, _ = default_code(["stdlib-heldout"])["stdlib-heldout"]
    return [p.read_text(encoding="utf-8") for p in files[:n_files]]


def _agreement(ours, theirs, texts: list[str]) -> dict:
    same = [ours(t) == theirs(t) for t in texts]
    return {"identical": sum(same), "of": len(same),
            "differs": [t for t, s in zip(texts, same) if not s][:5]}


def _tokenization(m, gguf: Path, hf: Path, threads: int) -> dict:
    out = {}
    held = _texts(20)
    ours = lambda t: m.tokenizer.encode(t, bos=True)  # noqa: E731
    try:
        from llama_cpp import Llama
    except ImportError:
        out["llama.cpp"] = "llama-cpp-python is not installed"
    else:
        llm = Llama(model_path=str(gguf), vocab_only=True, verbose=False, n_threads=threads)
        theirs = lambda t: llm.tokenize(t.encode("utf-8"), add_bos=True, special=False)  # noqa: E731
        out["llama.cpp"] = {"heldout_files": _agreement(ours, theirs, held),
                            "tricky": _agreement(ours, theirs, TRICKY)}
    try:
        from transformers import AutoTokenizer
    except ImportError:
        out["transformers"] = "transformers is not installed"
    else:
        tok = AutoTokenizer.from_pretrained(hf)
        theirs = lambda t: tok(t)["input_ids"]  # noqa: E731
        out["transformers"] = {"class": type(tok).__name__,
                               "heldout_files": _agreement(ours, theirs, held),
                               "tricky": _agreement(ours, theirs, TRICKY)}
    return out


def run(model: str, *, prompt_tokens: int = 256, new_tokens: int = 128, threads: int = 2,
        log=print) -> dict:
    import spark_model
    from spark_model.formats.export import export

    m = spark_model.load(model, capacity=prompt_tokens + new_tokens + 16, weights="f32")
    prompt = bench_import._prompt_ids(m, prompt_tokens)
    ours = m.generate_tokens([prompt], new_tokens, ignore_eos=True)[0]
    seq = prompt + ours
    ours_logits = np.asarray(m.logits(np.asarray([seq]))[0], np.float64)
    result: dict = {"model": model, "prompt_tokens": len(prompt), "new_tokens": new_tokens}
    log(f"{model}: {len(prompt)}-token prompt, {new_tokens} greedy tokens")
    with tempfile.TemporaryDirectory(prefix="spark-bench-export-") as tmp:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gguf = export(m, "gguf", Path(tmp) / "m.gguf")
            hf = export(m, "hf", Path(tmp) / "hf")
        result["export_warnings"] = sorted({str(w.message).split(": ", 1)[-1] for w in caught})
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            result["llama.cpp"] = "llama-cpp-python is not installed"
        else:
            result["llama.cpp"] = bench_import._compare(
                ours, ours_logits, *bench_import.llama_cpp_peer(gguf, prompt, new_tokens, seq,
                                                                threads))
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            result["transformers"] = "torch/transformers are not installed"
        else:
            result["transformers"] = bench_import._compare(
                ours, ours_logits, *bench_import.transformers_peer(hf, prompt, new_tokens,
                                                                   seq))
        result["tokenization"] = _tokenization(m, gguf, hf, threads)
    for peer in ("llama.cpp", "transformers"):
        r = result[peer]
        if isinstance(r, str):
            log(f"  {peer:12s} skipped: {r}")
            continue
        where = ("all identical" if r["identical_tokens"]
                 else f"first difference at new token {r['first_difference']}")
        log(f"  {peer:12s} greedy {new_tokens} tokens (ids fed directly): {where}; largest "
            f"logit difference {r['max_logit_diff']:.2e}")
        t = result["tokenization"][peer]
        if isinstance(t, dict):
            log(f"  {peer:12s} tokenizer from the export: {t['heldout_files']['identical']}/"
                f"{t['heldout_files']['of']} held-out files and {t['tricky']['identical']}/"
                f"{t['tricky']['of']} tricky strings give Spark's ids; differs on "
                f"{t['tricky']['differs']}")
    for w in result["export_warnings"]:
        log(f"  export warning: {w}")
    return result


def main(argv: list[str]) -> int:
    models = argv or ["checkpoints/spark-tiny", "smollm2-135m"]
    results = [run(name) for name in models]
    print(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
