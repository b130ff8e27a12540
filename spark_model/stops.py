"""Stop strings, matched on bytes inside the compiled loop.

A stop string may start inside one token and end inside another, so matching works on
bytes: each sequence keeps the last M bytes it generated (its "tail"); each step appends
the new token's bytes and checks whether any stop string ends inside them. Stop strings are
traced arrays of fixed shape (slots x M), so a new list of stops does not recompile.
The host cuts the final text at the stop string; the loop only needs to know when to stop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

MAX_STOPS = 8  # stop-string slots per call
_EMPTY = -1  # tail filler that matches no byte


def stop_width(stops: list[str]) -> int:
    """M: bytes kept per tail, a power of two (>= 16) holding the longest stop string."""
    longest = max([len(s.encode("utf-8")) for s in stops] + [1])
    return max(16, 1 << (longest - 1).bit_length())


@struct.dataclass
class StopSpec:
    """Stop strings right-aligned in (MAX_STOPS, M) int16 rows, -1 where unused."""

    bytes_sm: jax.Array
    lengths_s: jax.Array  # 0 marks an unused slot

    @classmethod
    def make(cls, stops: list[str], width: int) -> "StopSpec":
        rows, lengths = cls.host_arrays(stops, width)
        return cls(bytes_sm=jnp.asarray(rows), lengths_s=jnp.asarray(lengths))

    @staticmethod
    def host_arrays(stops: list[str], width: int) -> tuple[np.ndarray, np.ndarray]:
        """The (MAX_STOPS, width) bytes and (MAX_STOPS,) lengths as host arrays: what a
        caller assembling many requests' settings on the host wants (a round trip through
        the device costs more than building them)."""
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
        rows = np.full((MAX_STOPS, width), _EMPTY, np.int16)
        lengths = np.zeros((MAX_STOPS,), np.int32)
        for i, s in enumerate(stops):
            b = np.frombuffer(s.encode("utf-8"), np.uint8)
            if not 0 < len(b) <= width:
                raise ValueError(f"stop string {s!r} must be 1..{width} bytes")
            rows[i, width - len(b):] = b
            lengths[i] = len(b)
        return rows, lengths


def token_byte_table(token_bytes: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(V, W) int16 bytes of every token (-1 padded) and their lengths (V,)."""
    width = max(1, max(len(b) for b in token_bytes))
    table = np.full((len(token_bytes), width), _EMPTY, np.int16)
    lengths = np.zeros((len(token_bytes),), np.int32)
    for i, b in enumerate(token_bytes):
        table[i, :len(b)] = np.frombuffer(b, np.uint8)
        lengths[i] = len(b)
    return table, lengths


def empty_tail(batch: int, width: int) -> jax.Array:
    return jnp.full((batch, width), _EMPTY, jnp.int16)


def advance(tail_bm: jax.Array, token_b: jax.Array, table_vw: jax.Array,
            lengths_v: jax.Array, spec: StopSpec) -> tuple[jax.Array, jax.Array]:
    """Append each sequence's new token; return (new tail, whether a stop string ended).

    The spec is shared by the batch ((S, M) bytes) or given per sequence ((B, S, M)), as
    the serving engine does: each of its slots holds a different request.

    When no sequence has a stop string the matching is skipped (it costs about a tenth of
    a one-row decode step on CPU) and the tails are left as they are: a tail matters only
    to its own sequence's stop strings, and a sequence's stop strings never change.
    """
    return jax.lax.cond(jnp.any(spec.lengths_s > 0),
                        lambda: _advance(tail_bm, token_b, table_vw, lengths_v, spec),
                        lambda: (tail_bm, jnp.zeros(token_b.shape, bool)))


def _advance(tail_bm, token_b, table_vw, lengths_v, spec):
    m = tail_bm.shape[1]
    new_bw = table_vw[token_b]  # (B, W)
    n_new = lengths_v[token_b]  # (B,)
    b, w = new_bw.shape
    combined = jnp.concatenate([tail_bm, new_bw], axis=1)  # (B, M + W)
    # Window i ends right after new byte i: combined[i + 1 : i + 1 + M], shape (B, W, M).
    windows = jax.vmap(lambda i: jax.lax.dynamic_slice_in_dim(combined, i + 1, m, axis=1),
                       out_axes=1)(jnp.arange(w))
    stop_bsm = jnp.broadcast_to(spec.bytes_sm, (b,) + spec.bytes_sm.shape[-2:])
    len_bs = jnp.broadcast_to(spec.lengths_s, stop_bsm.shape[:2])
    used = jnp.arange(m)[None, None, :] >= (m - len_bs[:, :, None])  # (B, S, M) right-aligned
    eq = windows[:, :, None, :] == stop_bsm[:, None, :, :]  # (B, W, S, M)
    hit = jnp.all(eq | ~used[:, None], axis=-1) & (len_bs > 0)[:, None]
    in_new = jnp.arange(w)[None, :] < n_new[:, None]  # (B, W)
    stopped = jnp.any(hit & in_new[:, :, None], axis=(1, 2))
    new_tail = jax.vmap(lambda c, n: jax.lax.dynamic_slice_in_dim(c, n, m))(combined, n_new)
    return new_tail, stopped
