"""Next-line completion on a run's held-out files (eval/line_completion.py), for fine-tuning
runs: scored before the first step and after the last, next to bits per byte."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from spark_model.config import ModelConfig

MAX_NEW_TOKENS = 64  # per completed line, as `spark eval --tasks line`


def held_out_lines(host_params: dict[str, np.ndarray], cfg: ModelConfig, tokenizer: Any,
                   files: Sequence[Path], samples: int, context: int, seed: int = 0
                   ) -> dict | None:
    """Exact match and edit similarity of `samples` greedy next-line completions cut from
    `files` with up to `context` tokens before each cut; None when no file can be cut."""
    from eval import line_completion as lc
    from spark_model import checkpoint
    from spark_model.api import SparkModel

    try:
        cuts = lc.sample_lines("heldout", files, samples, seed)
    except lc.LineTaskError:
        return None
    model = SparkModel(checkpoint.model_from_flat(cfg, host_params), tokenizer,
                       capacity=min(cfg.max_seq_len, context + 1 + MAX_NEW_TOKENS))
    context = min(context, model.capacity - 1 - MAX_NEW_TOKENS)
    with tempfile.TemporaryDirectory() as tmp:
        got = lc.run(model, cuts, tmp, model_id="run", context=context,
                     max_new_tokens=MAX_NEW_TOKENS, progress=False)
    s = got["sources"]["heldout"]
    return {"line_exact_match": s["exact_match"], "line_edit_similarity": s["edit_similarity"],
            "line_samples": s["samples"], "line_context": context}
