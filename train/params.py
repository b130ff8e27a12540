"""The model's parameters as a flat {dotted name: array} dict, and back."""

from __future__ import annotations

import jax
from flax import nnx

from spark_model import checkpoint
from spark_model.config import ModelConfig
from spark_model.transformer import Transformer, abstract_model


class ParamTree:
    """Converts between the model and a flat {dotted name: array} dict of its parameters.

    The names are those of `spark_model.checkpoint.flat_params`; a flat dict with string
    keys is what the optimizer, the sharding rules, orbax and the export all share.
    """

    def __init__(self, cfg: ModelConfig):
        self.graphdef, state = nnx.split(abstract_model(cfg))
        leaves_with_path, self.treedef = jax.tree_util.tree_flatten_with_path(state)
        self.names = [checkpoint.param_name(p) for p, _ in leaves_with_path]
        self.shapes = {n: (tuple(x.shape), x.dtype) for n, (_, x)
                       in zip(self.names, leaves_with_path)}

    def model(self, flat: dict[str, jax.Array]) -> Transformer:
        state = jax.tree_util.tree_unflatten(self.treedef, [flat[n] for n in self.names])
        return nnx.merge(self.graphdef, state)

    @staticmethod
    def flat(model: Transformer) -> dict[str, jax.Array]:
        _, state = nnx.split(model)
        leaves = jax.tree_util.tree_flatten_with_path(state)[0]
        return {checkpoint.param_name(p): x for p, x in leaves}
