"""The device mesh and the FSDP rule.

A 1-D `jax.sharding.Mesh` over all devices with axis "data". Each batch is split over it
(data parallel); parameters and optimizer state are replicated, or with ``fsdp`` sharded
over the same axis along their largest dimension that the device count divides (parameters
it does not divide stay replicated). XLA inserts the all-gathers and reduce-scatters from
the `in_shardings`/`out_shardings` of the one jitted step (train/trainer.py).
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D data-parallel mesh (axis "data") over `devices` (default: all of them)."""
    devs = np.asarray(list(devices) if devices is not None else jax.devices())
    return Mesh(devs, ("data",))


def fsdp_spec(shape: tuple[int, ...], n: int) -> P:
    """Shard the largest dimension that `n` divides over "data"; replicate otherwise."""
    if n > 1:
        for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
            if shape[dim] % n == 0 and shape[dim] >= n:
                spec: list[str | None] = [None] * len(shape)
                spec[dim] = "data"
                return P(*spec)
    return P()
