"""Low-rank adapters (LoRA) on the attention and MLP products of every block.

A product's weight W keeps its stored layout, input axes first (attn.q (D, N, H), attn.o
(N, H, D), mlp.down (F, D), ...); read as a (n_in, n_out) matrix, its adapted value is

    W + (alpha / rank) * A @ B        A (n_in, rank), B (rank, n_out)

with A drawn from N(0, 1/n_in) and B zero, so training starts from the base model exactly.
Only the adapters train (the optimizer holds state for them alone); the base weights stay
frozen, and the exported model has the adapters merged into them (`merge_host`), so it is an
ordinary checkpoint that every tool (and `spark export`) reads.
"""

from __future__ import annotations

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from train.config import SettingsError

# Adapted product -> how many leading axes of its weight are inputs.
TARGETS = {"attn.q": 1, "attn.k": 1, "attn.v": 1, "attn.o": 2,
           "mlp.gate": 1, "mlp.up": 1, "mlp.down": 1}
A_SUFFIX, B_SUFFIX = ".lora_a", ".lora_b"


def _is_target(name: str) -> bool:
    parts = name.split(".")
    return len(parts) == 4 and parts[0] == "blocks" and ".".join(parts[2:]) in TARGETS


def target_dims(shapes: Mapping[str, tuple]) -> dict[str, tuple[int, int]]:
    """{weight name: (n_in, n_out)} of every adapted weight, from {name: (shape, dtype)}."""
    out = {}
    for name, (shape, _) in shapes.items():
        if _is_target(name):
            k = TARGETS[".".join(name.split(".")[2:])]
            out[name] = (math.prod(shape[:k]), math.prod(shape[k:]))
    return out


def check_rank(rank: int, shapes: Mapping[str, tuple]) -> None:
    """A usage error unless 1 <= rank <= the smallest side of every adapted weight."""
    dims = target_dims(shapes)
    smallest = min(min(d) for d in dims.values())
    if not 1 <= rank <= smallest:
        raise SettingsError(f"--lora must be in [1, {smallest}] for this model (the smallest "
                            f"side of its adapted weights), got {rank}")


def adapter_shapes(shapes: Mapping[str, tuple], rank: int) -> dict[str, tuple]:
    """{adapter name: (shape, float32)} for rank `rank`."""
    out = {}
    for name, (n_in, n_out) in target_dims(shapes).items():
        out[name + A_SUFFIX] = ((n_in, rank), jnp.float32)
        out[name + B_SUFFIX] = ((rank, n_out), jnp.float32)
    return out


def init_adapters(key: jax.Array, shapes: Mapping[str, tuple], rank: int
                  ) -> dict[str, jax.Array]:
    """Fresh adapters: A ~ N(0, 1/n_in), B = 0 (the adapted model equals the base)."""
    dims = target_dims(shapes)
    keys = jax.random.split(key, len(dims))
    out = {}
    for k, (name, (n_in, n_out)) in zip(keys, sorted(dims.items())):
        out[name + A_SUFFIX] = jax.random.normal(k, (n_in, rank), jnp.float32) / math.sqrt(n_in)
        out[name + B_SUFFIX] = jnp.zeros((rank, n_out), jnp.float32)
    return out


def merge(base: Mapping[str, jax.Array], adapters: Mapping[str, jax.Array], scale: float
          ) -> dict[str, jax.Array]:
    """The adapted weights (traced: the training forward)."""
    out = dict(base)
    for name in target_dims({n: (w.shape, w.dtype) for n, w in base.items()}):
        delta = adapters[name + A_SUFFIX] @ adapters[name + B_SUFFIX]
        out[name] = base[name] + (scale * delta).reshape(base[name].shape).astype(
            base[name].dtype)
    return out


def merge_host(base: Mapping[str, np.ndarray], adapters: Mapping[str, np.ndarray],
               scale: float) -> dict[str, np.ndarray]:
    """The adapted weights in NumPy, for export. Where an adapter's update is exactly
    zero the base weight is kept bit for bit (adding +0.0 would turn a -0.0 weight into
    +0.0)."""
    out = dict(base)
    for name in target_dims({n: (w.shape, w.dtype) for n, w in base.items()}):
        a = np.asarray(adapters[name + A_SUFFIX], np.float32)
        b = np.asarray(adapters[name + B_SUFFIX], np.float32)
        delta = (np.float32(scale) * (a @ b)).reshape(base[name].shape).astype(base[name].dtype)
        out[name] = np.where(delta == 0, base[name], base[name] + delta)
    return out


def param_fingerprint(params: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of `params` (the frozen base a
    resumed LoRA run must find again)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(params):
        a = np.ascontiguousarray(params[name])
        h.update(f"{name} {a.shape} {a.dtype}\n".encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()
