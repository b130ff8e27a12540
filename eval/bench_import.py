"""`spark bench import`: an imported model against the engines it came from.

The model is loaded by Spark (dequantized to float32), then exported at float32 with
`spark_model.formats.export` (what `spark export` writes) — as a GGUF file for llama.cpp
(`llama-cpp-python`) and as a Hugging Face directory for `transformers` — so all three run
the very same weights. For each peer: the greedy continuation of a prompt (new tokens, all
identical or the first position that differs), and the largest absolute logit difference
over every position of prompt + continuation.
Both peers are optional (`pip install -e '.[bench]'`); a missing one is reported, not fatal.
"""

from __future__ import annotations

import importlib.util
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from eval.sources import default_code


def _prompt_ids(m, n: int) -> list[int]:
    """The first n tokens of the held-out stdlib files, in path order."""
    files, _ = default_code(["stdlib-heldout"])["stdlib-heldout"]
    ids = m.tokenizer.encode("", bos=True)
    for path in files:
        ids += m.tokenizer.encode(path.read_text(encoding="utf-8"))
        if len(ids) >= n:
            return ids[:n]
    raise ValueError(f"the held-out files give {len(ids)} tokens, fewer than {n}")


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _compare(ours_tokens, ours_logits, peer_tokens, peer_logits, seconds) -> dict:
    diff = np.abs(np.asarray(peer_logits, np.float64) - ours_logits)
    return {"identical_tokens": peer_tokens == ours_tokens,
            "first_difference": _first_difference(ours_tokens, peer_tokens),
            "max_logit_diff": float(diff.max()),
            "argmax_agreement": float(np.mean(np.argmax(peer_logits, -1)
                                              == np.argmax(ours_logits, -1))),
            "peer_seconds": seconds}


def llama_cpp_peer(gguf_path: Path, prompt: list[int], new_tokens: int, seq: list[int],
                   threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=max(2048, len(seq) + 8), logits_all=True,
                n_threads=threads, n_batch=512, verbose=False)
    t0 = time.perf_counter()
    llm.eval(prompt)
    tokens = []
    for _ in range(new_tokens):  # greedy: our own argmax over llama.cpp's logits
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(tok)
        llm.eval([tok])
    seconds = time.perf_counter() - t0
    llm.reset()
    llm.eval(seq)
    logits = np.array(llm.scores[:len(seq)], np.float64)
    return tokens, logits, seconds


def transformers_peer(hf_dir: Path, prompt: list[int], new_tokens: int, seq: list[int]):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
        seconds = time.perf_counter() - t0
        logits = model(torch.tensor([seq])).logits[0].double().numpy()
    return out[0, len(prompt):].tolist(), logits, seconds


def run(model: str, *, prompt_tokens: int = 768, new_tokens: int = 256, threads: int = 2,
        log=print) -> dict:
    import spark_model
    from spark_model.formats.detect import resolve
    from spark_model.formats.export import export

    path = resolve(model)
    m = spark_model.load(model, capacity=prompt_tokens + new_tokens + 16, weights="f32")
    prompt = _prompt_ids(m, prompt_tokens)
    ours_tokens = m.generate_tokens([prompt], new_tokens, ignore_eos=True)[0]
    seq = prompt + ours_tokens
    ours_logits = np.asarray(m.logits(np.asarray([seq]))[0], np.float64)
    result = {"model": str(path), "prompt_tokens": len(prompt), "new_tokens": new_tokens,
              "positions": len(seq)}
    log(f"{path}: {len(prompt)}-token prompt, {new_tokens} greedy tokens, "
        f"logits at {len(seq)} positions")
    with tempfile.TemporaryDirectory(prefix="spark-bench-import-") as tmp, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export's tokenizer caveats; ids are fed directly
        peers = {  # name -> (modules it needs, export format, runner)
            "llama.cpp": (("llama_cpp",), "gguf",
                          lambda f: llama_cpp_peer(f, prompt, new_tokens, seq, threads)),
            "transformers": (("torch", "transformers"), "hf",
                             lambda d: transformers_peer(d, prompt, new_tokens, seq)),
        }
        for name, (modules, fmt, peer_run) in peers.items():
            missing = [mod for mod in modules if importlib.util.find_spec(mod) is None]
            if missing:
                result[name] = f"{', '.join(missing)} not installed (pip install -e '.[bench]')"
                continue
            exported = export(m, fmt, Path(tmp) / f"f32.{fmt}")
            result[name] = _compare(ours_tokens, ours_logits, *peer_run(exported))
    for peer in ("llama.cpp", "transformers"):
        r = result[peer]
        if isinstance(r, str):
            log(f"  {peer:12s} skipped: {r}")
        else:
            where = ("all identical" if r["identical_tokens"]
                     else f"first difference at new token {r['first_difference']}")
            log(f"  {peer:12s} greedy {new_tokens} tokens: {where}; largest logit difference "
                f"{r['max_logit_diff']:.4f}; argmax agreement {r['argmax_agreement']:.4f}")
    return result


def main(model: str, json_path: str | None) -> int:
    result = run(model)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return 0
