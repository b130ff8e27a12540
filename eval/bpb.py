"""Bits per byte of a model on source files: a tokenizer-independent measure of fit.

Loss per token depends on the tokenizer (a bigger vocabulary means fewer, harder tokens);
dividing the total negative log-likelihood by the number of UTF-8 bytes predicted makes
models with different tokenizers comparable:

    bpb = sum over files of NLL(tokens after BOS, in nats) / (total bytes * ln 2)

Each file is encoded as BOS + text + EOS (so the model is also charged for predicting
the end of the file) and scored in non-overlapping windows of `seq_len` predictions: a
window covers tokens [i*L, i*L + L] and scores the last L of them given the ones before,
inside the window only. Every token except the first BOS is predicted exactly once.
Tokens after the first window see less than a full context, so this is a slight upper
bound on what a sliding window would give; the window is the model's training length
(`seq_len` argument, else `model.train_seq_len` / `model.config.train_seq_len` if the
model has one, else min(2048, config.max_seq_len)) so no position is out of training
range. A batch is right-padded with token 0 and masked to the power of two at or above its
longest row (at most seq_len), so a jitted model compiles for a few shapes only and short
files do not pay for a long window; causal attention makes right padding harmless.

The model object is duck-typed: `tokenizer.encode(text, bos=True, eos=True)` and either
`nll(tokens (B, T), targets (B, T)) -> (B, T)` nats (spark_model.SparkModel: blockwise
attention and chunked logits, so memory grows linearly with the window and any window
up to max_seq_len fits) or `logits(tokens (B, T) int) -> (B, T, V) float`. A window
longer than the model's `config.max_seq_len` is refused with a BpbError.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from spark_model.tokenizers_io import document_ids  # noqa: F401 - re-exported

DEFAULT_SEQ_LEN = 2048


class BpbError(ValueError):
    """No usable input, or a path that does not exist."""


def collect_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The files named, plus every .py file under the directories named (sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*.py") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise BpbError(f"bpb data path {p} does not exist")
    return files


def _default_seq_len(model_obj: Any) -> int:
    for owner in (model_obj, getattr(model_obj, "config", None)):
        value = getattr(owner, "train_seq_len", None)
        if isinstance(value, int) and value > 0:
            return value
    max_len = getattr(getattr(model_obj, "config", None), "max_seq_len", None)
    return min(DEFAULT_SEQ_LEN, max_len) if isinstance(max_len, int) else DEFAULT_SEQ_LEN


def _windows(tokens: Sequence[int], seq_len: int):
    """(inputs, targets) pairs covering every token after the first exactly once."""
    for start in range(0, len(tokens) - 1, seq_len):
        chunk = tokens[start:start + seq_len + 1]
        yield chunk[:-1], chunk[1:]


def token_nll(model_obj: Any, inputs_bt: np.ndarray, targets_bt: np.ndarray) -> np.ndarray:
    """-log p(target) in nats per position, (B, T) float64: the model's memory-lean `nll`
    when it has one, else log-softmax over its full `logits`."""
    if callable(getattr(model_obj, "nll", None)):
        return np.asarray(model_obj.nll(inputs_bt, targets_bt), np.float64)
    import jax
    import jax.numpy as jnp

    logits = jnp.asarray(model_obj.logits(inputs_bt), jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.asarray(targets_bt)[..., None], axis=-1)[..., 0]
    return np.asarray(logz - picked, np.float64)


def _nll_sum(model_obj: Any, rows: list[tuple[Sequence[int], Sequence[int]]],
             batch: int, seq_len: int) -> float:
    """Sum of -log p(target) in nats over the real (unpadded) positions of `rows`."""
    longest = max(len(x) for x, _ in rows)
    width = min(seq_len, max(16, 1 << (longest - 1).bit_length()))
    inputs = np.zeros((batch, width), np.int32)
    targets = np.zeros((batch, width), np.int32)
    mask = np.zeros((batch, width), np.float32)
    for r, (x, y) in enumerate(rows):
        inputs[r, :len(x)] = x
        targets[r, :len(y)] = y
        mask[r, :len(y)] = 1.0
    return float(np.sum(token_nll(model_obj, inputs, targets) * mask))


def bits_per_byte(model_obj: Any, paths: Iterable[str | os.PathLike], *,
                  seq_len: int | None = None, batch: int = 4,
                  progress: bool = False) -> dict:
    """Bits per UTF-8 byte of `model_obj` on the files (directories: every .py inside).

    Returns {"bits_per_byte", "nll_nats", "tokens" (scored), "bytes", "files",
    "skipped", "skipped_files", "seq_len", "tokens_per_byte"}. Files that cannot be read
    or are not UTF-8 are skipped and counted; empty files carry no bytes and are skipped.
    """
    if batch < 1:
        raise ValueError("batch must be >= 1")
    seq_len = seq_len if seq_len is not None else _default_seq_len(model_obj)
    if seq_len < 1:
        raise ValueError("seq_len must be >= 1")
    max_len = getattr(getattr(model_obj, "config", None), "max_seq_len", None)
    if isinstance(max_len, int) and seq_len > max_len:
        raise BpbError(f"a scoring window of {seq_len} tokens is longer than the model's "
                       f"{max_len} positions")
    files = collect_files(paths)
    skipped: list[str] = []
    total_bytes = 0
    total_tokens = 0
    used = 0
    rows: list[tuple[Sequence[int], Sequence[int]]] = []
    nll = 0.0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(files), desc="bpb", unit="file", dynamic_ncols=True)
    try:
        for f in files:
            try:
                text = f.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                skipped.append(str(f))
                continue
            finally:
                if bar is not None:
                    bar.update(1)
            if not text:
                skipped.append(str(f))
                continue
            tokens = document_ids(model_obj.tokenizer, text)
            used += 1
            total_bytes += len(text.encode("utf-8"))
            total_tokens += len(tokens) - 1
            for window in _windows(tokens, seq_len):
                rows.append(window)
                if len(rows) == batch:
                    nll += _nll_sum(model_obj, rows, batch, seq_len)
                    rows = []
        if rows:
            nll += _nll_sum(model_obj, rows, batch, seq_len)
    finally:
        if bar is not None:
            bar.close()
    if total_bytes == 0:
        raise BpbError(f"no readable UTF-8 text in {len(files)} file(s) "
                       f"({len(skipped)} skipped)")
    return {
        "bits_per_byte": nll / (total_bytes * math.log(2)),
        "nll_nats": nll,
        "tokens": total_tokens,
        "bytes": total_bytes,
        "tokens_per_byte": total_tokens / total_bytes,
        "files": used,
        "skipped": len(skipped),
        "skipped_files": skipped[:20],
        "seq_len": seq_len,
    }
