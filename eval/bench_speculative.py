"""`spark bench latency` sections for prompt-lookup speculative decoding (issue 20, 1).

Both run the model in this process (`SparkModel.generate_tokens`, one prompt at a time,
greedy), once plainly and once with `speculative="prompt_lookup"`, and compare:

  edit_workload  functions from the held-out standard-library files; each prompt is the
                 function, a comment announcing it again with one change (a new name),
                 and the renamed header. Effective tokens/s (new tokens / wall time) with
                 and without speculation, end to end and for the decoding after the first
                 token (wall time less a timed prefill-and-first-token call of the same
                 prompt, which speculation cannot shorten), the acceptance rate (accepted /
                 drafted), the mean tokens emitted per verify step, and whether every
                 greedy output was identical. Target: speculation at least 3x plain tokens/s.
  fresh_code     HumanEval prompts, where drafts rarely match: the slowdown from
                 speculation. Target: at most 5% slower.

Every prompt length bucket is compiled by an untimed call first, so the times are
steady-state decoding.
"""

from __future__ import annotations

import ast
import textwrap
import time

import numpy as np

EDIT_FUNCTIONS = 50
FRESH_PROBLEMS = 20
FRESH_TOKENS = 128
DRAFT_TOKENS = 7
MAX_FUNCTION_TOKENS = 200
CAPACITY = 1024
STOPS = ["\ndef ", "\nclass ", "\n\n\n", "\nif __name__"]
TARGET_EDIT_SPEEDUP = 3.0
TARGET_FRESH_SLOWDOWN = 0.05


def edit_prompts(code: list[str], n: int, tokenizer) -> list[tuple[str, int]]:
    """n (prompt, max_new_tokens) from undecorated functions of 5 to 30 lines in the code:
    the function, the comment, the renamed header; max_new covers the body and a margin."""
    out: list[tuple[str, int]] = []
    for text in code:
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef) or node.decorator_list:
                continue
            src = ast.get_source_segment(text, node, padded=True)
            if src is None or not 5 <= src.count("\n") + 1 <= 30:
                continue
            src = textwrap.dedent(src)
            lines = src.splitlines()
            header_n = node.body[0].lineno - node.lineno
            if header_n < 1:
                continue
            new_name = node.name + "_v2"
            header = "\n".join(lines[:header_n]).replace(f"def {node.name}(",
                                                         f"def {new_name}(", 1)
            prompt = (f"{src}\n\n# The same function again with one change: it is renamed "
                      f"{new_name}.\n{header}\n")
            try:
                body = tokenizer.encode("\n".join(lines[header_n:]))
            except ValueError:
                continue
            if len(body) > MAX_FUNCTION_TOKENS:
                continue
            out.append((prompt, len(body) + 16))
            if len(out) == n:
                return out
    raise ValueError(f"the held-out code has {len(out)} usable functions; {n} are needed")


def _compare(model, prompts: list[tuple[str, int]], stop: list[str], k: int) -> dict:
    """Plain and speculative greedy decoding of each prompt alone: totals and equality."""
    ids = [model.tokenizer.encode(p, bos=True) for p, _ in prompts]
    from spark_model import engine

    seen = set()
    for row, (_, n) in zip(ids, prompts):  # compile every shape once, untimed
        shape = (engine.bucket(len(row)), engine.bucket(n))
        if shape not in seen:
            seen.add(shape)
            model.generate_tokens([row], n, stop=stop)
            model.generate_tokens([row], 1, stop=stop)
            model.generate_tokens([row], n, stop=stop, speculative="prompt_lookup",
                                  draft_tokens=k)
    totals = {"plain_s": 0.0, "spec_s": 0.0, "first_s": 0.0, "tokens": 0, "drafted": 0,
              "accepted": 0, "steps": 0, "identical": 0}
    for row, (_, n) in zip(ids, prompts):
        t0 = time.perf_counter()  # prefill and the first token: the same for both
        model.generate_tokens([row], 1, stop=stop)
        totals["first_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        plain = model.generate_tokens([row], n, stop=stop)
        totals["plain_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        spec = model.generate_tokens([row], n, stop=stop, speculative="prompt_lookup",
                                     draft_tokens=k)
        totals["spec_s"] += time.perf_counter() - t0
        stats = model.last_stats
        totals["tokens"] += len(spec[0])
        totals["drafted"] += stats["drafted_tokens"]
        totals["accepted"] += stats["accepted_tokens"]
        totals["steps"] += stats["steps"]
        totals["identical"] += plain == spec
    plain_tps = totals["tokens"] / totals["plain_s"]
    spec_tps = totals["tokens"] / totals["spec_s"]
    after_first = totals["tokens"] - len(ids)  # tokens the decode loop made
    plain_dec = after_first / max(totals["plain_s"] - totals["first_s"], 1e-9)
    spec_dec = after_first / max(totals["spec_s"] - totals["first_s"], 1e-9)
    return {"implemented": True, "prompts": len(ids), "draft_tokens": k,
            "new_tokens": totals["tokens"], "plain_tokens_per_s": plain_tps,
            "spec_tokens_per_s": spec_tps, "speedup": spec_tps / plain_tps,
            "first_token_s": totals["first_s"] / len(ids),
            "plain_decode_tokens_per_s": plain_dec, "spec_decode_tokens_per_s": spec_dec,
            "decode_speedup": spec_dec / plain_dec,
            "acceptance_rate": totals["accepted"] / max(totals["drafted"], 1),
            "tokens_per_step": totals["tokens"] / max(totals["steps"], 1),
            "drafted_tokens": totals["drafted"], "accepted_tokens": totals["accepted"],
            "identical_outputs": totals["identical"],
            "all_identical": totals["identical"] == len(ids)}


def _load(run):
    import spark_model

    return spark_model.load(None if run.model == "spark-tiny" else run.model,
                            capacity=CAPACITY)


def edit_workload(run) -> dict:
    model = _load(run)
    prompts = edit_prompts(run.code, EDIT_FUNCTIONS, model.tokenizer)
    out = _compare(model, prompts, STOPS, DRAFT_TOKENS)
    out.update(target_speedup=TARGET_EDIT_SPEEDUP,
               met=out["speedup"] >= TARGET_EDIT_SPEEDUP and out["all_identical"])
    return out


def fresh_code(run) -> dict:
    from eval.humaneval import load_problems

    model = _load(run)
    problems = list(load_problems().values())[:FRESH_PROBLEMS]
    prompts = [(p["prompt"], FRESH_TOKENS) for p in problems]
    out = _compare(model, prompts, STOPS, DRAFT_TOKENS)
    slowdown = 1.0 / out["speedup"] - 1.0
    out.update(slowdown=slowdown, target_slowdown=TARGET_FRESH_SLOWDOWN,
               met=slowdown <= TARGET_FRESH_SLOWDOWN and out["all_identical"])
    return out


def summary(r: dict) -> str:
    """One line for the bench's report."""
    extra = (f"slowdown {r['slowdown']:+.1%} (target <= {r['target_slowdown']:.0%})"
             if "slowdown" in r else f"speedup {r['speedup']:.2f}x (target >= "
             f"{r['target_speedup']:.0f}x)")
    return (f"{r['prompts']} prompts, {r['new_tokens']} tokens: plain "
            f"{r['plain_tokens_per_s']:.1f} tok/s, speculative {r['spec_tokens_per_s']:.1f} "
            f"tok/s, {extra}: {'met' if r['met'] else 'MISSED'}; after the first token "
            f"{r['plain_decode_tokens_per_s']:.1f} -> {r['spec_decode_tokens_per_s']:.1f} tok/s "
            f"({r['decode_speedup']:.2f}x); acceptance "
            f"{r['acceptance_rate']:.1%}, {r['tokens_per_step']:.2f} tokens/step, "
            f"{r['identical_outputs']}/{r['prompts']} outputs identical")
