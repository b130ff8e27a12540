"""Host side of generation: checking requests, building the engine's inputs, cutting text.

Everything here runs once per call (or once per streamed chunk), never per token.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from spark_model import stops
from spark_model.engine import MAX_END_IDS, Constants, bucket
from spark_model.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked generation request: what the caller asked for, normalised."""

    prompts: tuple[str, ...]
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: tuple[str, ...]


def check_request(prompts: str | Sequence[str], *, max_new_tokens: int, temperature: float,
                  top_k: int, top_p: float, seed: int, stop: str | Sequence[str] | None
                  ) -> Request:
    """Validate every argument; raise TypeError/ValueError with a message naming it."""
    if isinstance(prompts, str):
        prompts = (prompts,)
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise TypeError("prompts must be a string or a non-empty list of strings")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"prompts[{i}] is {type(p).__name__}, not str")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0: off), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:  # NaN fails too
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) \
            or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    stop = tuple(stop)
    for s in stop:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
    if len(stop) > stops.MAX_STOPS:
        raise ValueError(f"at most {stops.MAX_STOPS} stop strings, got {len(stop)}")
    return Request(tuple(prompts), int(max_new_tokens), float(temperature), int(top_k),
                   float(top_p), int(seed), stop)


def row_seeds(seed: int, batch: int) -> np.ndarray:
    """One stream per row: duplicated prompts in a batch still draw different samples."""
    return ((np.uint64(seed) * np.uint64(0x9E3779B1) + np.arange(batch, dtype=np.uint64))
            % np.uint64(2**32)).astype(np.uint32)


def pad_prompts(ids: list[list[int]], pad_id: int, minimum: int = 16
                ) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token lists to a power-of-two width (>= minimum): (B, P) ids and (B,)
    lengths."""
    lengths = np.array([len(x) for x in ids], np.int32)
    out = np.full((len(ids), bucket(int(lengths.max()), minimum)), pad_id, np.int32)
    for row, x in zip(out, ids):
        row[:len(x)] = x
    return out, lengths


def end_id_vector(end_ids: Sequence[int], vocab_size: int | None = None) -> np.ndarray:
    """The engine's (MAX_END_IDS,) int32 end-id vector: the ids, then -1 (matches no token).

    An empty sequence gives all -1: generation runs to its budget (`ignore_eos`). More ids
    than MAX_END_IDS, or ids that are not token ids, are refused here rather than silently
    dropped (a dropped id would let generation run past the end of the text).
    """
    ids = tuple(end_ids)
    if len(ids) > MAX_END_IDS:
        raise ValueError(f"{len(ids)} end ids {ids}: the decode engine takes at most "
                         f"{MAX_END_IDS} (engine.MAX_END_IDS)")
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0 \
                or (vocab_size is not None and i >= vocab_size):
            span = f"[0, {vocab_size})" if vocab_size is not None else ">= 0"
            raise ValueError(f"end id {i!r} is not a token id {span}")
    out = np.full((MAX_END_IDS,), -1, np.int32)
    out[:len(ids)] = ids
    return out


def constants(req: Request, batch: int, token_table: tuple[np.ndarray, np.ndarray],
              end_ids: np.ndarray) -> Constants:
    """The engine's per-call inputs; end_ids is an `end_id_vector` (shape (MAX_END_IDS,))."""
    table, lengths = token_table
    return Constants(
        sampling=SamplingParams.make(batch, req.temperature, req.top_k, req.top_p,
                                     row_seeds(req.seed, batch)),
        stop_spec=stops.StopSpec.make(list(req.stop), stops.stop_width(list(req.stop))),
        token_bytes_vw=jnp.asarray(table), token_len_v=jnp.asarray(lengths),
        max_new=jnp.asarray(req.max_new_tokens, jnp.int32),
        end_ids=jnp.asarray(end_ids, jnp.int32))


class StopCutter:
    """Cuts streamed text at the first stop string, holding back what could start one."""

    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.buffer = ""
        self.stopped = False
        self.hit: str | None = None  # the stop string that ended the text

    def push(self, text: str) -> str:
        """Text that is now safe to show (never part of a stop string)."""
        if self.stopped:
            return ""
        self.buffer += text
        hits = [(i, s) for i, s in ((self.buffer.find(s), s) for s in self.stop) if i >= 0]
        if hits:
            at, self.hit = min(hits)
            out, self.buffer, self.stopped = self.buffer[:at], "", True
            return out
        safe = max(0, len(self.buffer) - self.hold)
        out, self.buffer = self.buffer[:safe], self.buffer[safe:]
        return out

    def finish(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out
