"""Positional skip-wise training (PoSE): position ids that reach a target context C while
each training sequence computes only its L = seq_len tokens.

Why: a model learns the relative distances it sees. Trained on contiguous windows of L
tokens, it never meets a query-key distance of L or more, and a long KV cache then holds
context it cannot use. Sequences of C = 131,072 tokens would teach those distances but
cost C^2 attention per sequence (flash attention keeps memory linear, not time), out of
reach on a CPU. PoSE keeps the L tokens and the cost of a window of L, and gives them
position ids spread over [0, C): distances between chunks reach up to C - 1, distances
inside a chunk stay the ordinary short ones. RoPE attention depends only on position
differences, so this is the signal a long sequence would give, sampled sparsely.

The rule, for one sequence of L tokens (all draws from one generator seeded by
(run seed, the sequence's place in the data stream), so a resumed run draws the same ids):
  - with probability 1 - share the sequence stays plain: ids 0 .. L-1;
  - otherwise it is cut into `chunks` non-empty chunks at distinct cut points drawn
    uniformly from 1 .. L-1, and chunk i (i >= 1) is shifted by a skip s_i: the s_i are
    `chunks - 1` values drawn uniformly (with replacement) from 0 .. C-L and sorted, so the
    last one, the total skip, reaches any value up to C - L. Chunk 0 starts at 0.
  Ids are then contiguous within a chunk, non-decreasing skips make them strictly
  increasing across chunks, and the last id is at most (L - 1) + (C - L) = C - 1. Every
  id in [0, C) has a positive chance, so over a run the whole range is covered.
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_CHUNKS = 2  # two chunks: the usual choice; more chunks shorten each one
# Three quarters of the sequences get skips, one quarter stays contiguous: the plain ones
# keep training the short, contiguous windows that held-out bits per byte are measured on
# (and that the starting checkpoint knows), the others carry the long distances.
DEFAULT_SHARE = 0.75
_STREAM = 0x9053  # separates these draws from the data order's generator


def sequence_positions(seq_len: int, target: int, rng: np.random.Generator,
                       chunks: int = DEFAULT_CHUNKS, share: float = 1.0) -> np.ndarray:
    """Position ids (seq_len,) int32 of one sequence by the module's rule."""
    if not 2 <= chunks <= seq_len:
        raise ValueError(f"chunks must be in [2, seq_len={seq_len}], got {chunks}")
    if target < seq_len:
        raise ValueError(f"target context {target} is below seq_len {seq_len}")
    pos_t = np.arange(seq_len, dtype=np.int64)
    skip_on = rng.random() < share  # drawn even at share 1.0: one draw pattern for all shares
    cuts = np.sort(rng.choice(np.arange(1, seq_len), size=chunks - 1, replace=False))
    skips = np.sort(rng.integers(0, target - seq_len, size=chunks - 1, endpoint=True))
    if skip_on:
        for cut, skip in zip(cuts, skips):  # chunk i starts at cut i-1, shifted by skip i
            pos_t[cut:] = np.arange(cut, seq_len) + skip
    return pos_t.astype(np.int32)


def batch_positions(seq_len: int, target: int, seed: int, position: int, count: int,
                    chunks: int = DEFAULT_CHUNKS, share: float = DEFAULT_SHARE) -> np.ndarray:
    """(count, seq_len) int32 position ids for the `count` sequences at data positions
    `position`, `position` + 1, ... (train/data.py's BatchIterator position): each row is a
    function of (seed, its own position) only, so batches, resumes and batch sizes agree."""
    return np.stack([
        sequence_positions(seq_len, target, np.random.default_rng([seed, _STREAM, p]),
                           chunks, share)
        for p in range(position, position + count)])


def longest_wavelength(cfg) -> float:
    """Tokens per full turn of the model's slowest rotary pair, after its rope scaling
    (spark_model.layers computes the frequencies; importing it imports JAX, hence here)."""
    from spark_model.layers import rope_frequencies
    freqs = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    return 2 * math.pi / float(np.min(freqs))
