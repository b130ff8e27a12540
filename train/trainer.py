"""The Trainer: the jitted, sharded train and eval steps of one (model config, settings,
mesh), fresh parameters and optimizer state, and the orbax restore target.

One optimizer step is one compiled program: the loss (train/loss.py) and its gradient
(averaged over the micro-batches with `lax.scan` under gradient accumulation), then the
optimizer (train/optim.py). Parameters, optimizer state and batches are placed by the
shardings of train/sharding.py; parameters and optimizer state are donated to the step.

The trained parameters are the model's own, or with LoRA (`tc.lora_rank`) low-rank adapters
(train/lora.py) over frozen base weights, which every step takes as a separate argument
(placed once, never donated, never in the optimizer).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from spark_model.config import ModelConfig
from spark_model.transformer import Transformer
from train import data as data_mod
from train import lora as lora_mod
from train.config import TrainConfig, TrainError
from train.loss import token_nll
from train.optim import decay_mask, make_optimizer, make_schedule
from train.params import ParamTree
from train.sharding import fsdp_spec, make_mesh

_INIT_FNS: dict[Any, Callable] = {}


class Trainer:
    """The jitted train and eval steps of one (model config, settings, mesh)."""

    def __init__(self, cfg: ModelConfig, tc: TrainConfig, mesh: Mesh | None = None,
                 base: dict[str, np.ndarray] | None = None):
        """`base`: the frozen weights LoRA adapts (required with tc.lora_rank > 0)."""
        self.cfg = cfg  # the exported config (with bf16, the step computes in a copy)
        self.tc = tc
        self.mesh = mesh if mesh is not None else make_mesh()
        self.n_dev = self.mesh.devices.size
        micro = tc.batch_size // tc.grad_accum
        if micro % self.n_dev:
            raise TrainError(
                f"the micro-batch of {micro} sequences (--batch-size {tc.batch_size} / "
                f"--grad-accum {tc.grad_accum}) must be a multiple of the {self.n_dev} devices")
        self.micro = micro
        compute_cfg = cfg.replace(dtype="bfloat16") if tc.bf16 else cfg
        self.tree = ParamTree(compute_cfg)
        self.lora = tc.lora_rank > 0
        if self.lora:
            if base is None:
                raise TrainError("LoRA training needs the base model's weights")
            lora_mod.check_rank(tc.lora_rank, self.tree.shapes)
            self.shapes = lora_mod.adapter_shapes(self.tree.shapes, tc.lora_rank)
        else:
            self.shapes = self.tree.shapes  # {trained name: (shape, dtype)}
        self.mask = decay_mask(list(self.shapes), self.shapes)
        self.schedule = make_schedule(tc)
        self.tx = make_optimizer(tc, self.mask)
        shard = self._spec if tc.fsdp else (lambda shape: P())
        self.param_shardings = {n: NamedSharding(self.mesh, shard(self.shapes[n][0]))
                                for n in self.shapes}
        self.base_shardings = ({n: NamedSharding(self.mesh, shard(self.tree.shapes[n][0]))
                                for n in self.tree.names} if self.lora else {})
        self._base_host = base if self.lora else None
        self.base = self.place(base) if self.lora else {}
        abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params())
        self.opt_shardings = jax.tree.map(
            lambda x: NamedSharding(self.mesh, shard(tuple(x.shape))), abstract_opt)
        self.batch_sharding = NamedSharding(self.mesh, P(None, "data", None))
        self.eval_sharding = NamedSharding(self.mesh, P("data", None))
        self.replicated = NamedSharding(self.mesh, P())
        self.eval_batch = self.micro
        self._step = jax.jit(
            self._train_step,
            in_shardings=(self.param_shardings, self.opt_shardings, self.batch_sharding,
                          self.base_shardings),
            out_shardings=(self.param_shardings, self.opt_shardings, self.replicated),
            donate_argnums=(0, 1))
        # The same step with the tokens' position ids (PoSE, train/pose.py) as a further
        # (grad_accum, micro, T) argument placed like the tokens; compiled only when used.
        self._step_pos = jax.jit(
            self._train_step,
            in_shardings=(self.param_shardings, self.opt_shardings, self.batch_sharding,
                          self.base_shardings, self.batch_sharding),
            out_shardings=(self.param_shardings, self.opt_shardings, self.replicated),
            donate_argnums=(0, 1))
        self._eval = jax.jit(
            self._eval_step,
            in_shardings=(self.param_shardings, self.base_shardings, self.eval_sharding,
                          self.eval_sharding, self.eval_sharding),
            out_shardings=self.replicated)

    def _spec(self, shape: tuple[int, ...]) -> P:
        return fsdp_spec(shape, self.n_dev)

    # -- state --------------------------------------------------------------------------
    def abstract_params(self) -> dict[str, jax.ShapeDtypeStruct]:
        return {n: jax.ShapeDtypeStruct(s, d) for n, (s, d) in self.shapes.items()}

    def abstract_state(self) -> dict[str, Any]:
        """Shapes, dtypes and shardings of {"params", "opt_state"} (the orbax target)."""
        params = {n: jax.ShapeDtypeStruct(s, d, sharding=self.param_shardings[n])
                  for n, (s, d) in self.shapes.items()}
        opt = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                           jax.eval_shape(self.tx.init, self.abstract_params()),
                           self.opt_shardings)
        return {"params": params, "opt_state": opt}

    def place(self, host: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Host arrays of the model's parameters, placed in their shardings (each process
        keeps its own shards)."""
        shardings = self.base_shardings if self.lora else self.param_shardings
        out = {}
        for name, (shape, dtype) in self.tree.shapes.items():
            a = np.asarray(host[name], dtype)
            if a.shape != shape:
                raise TrainError(f"parameter {name} has shape {a.shape}, the model needs "
                                 f"{shape}")
            out[name] = jax.make_array_from_callback(shape, shardings[name],
                                                     lambda idx, a=a: a[idx])
        return out

    def init(self, seed: int, start: dict[str, np.ndarray] | None = None
             ) -> tuple[dict[str, jax.Array], Any]:
        """Parameters and fresh optimizer state, placed directly in their shardings: the
        weights `start` when given (fine-tuning), fresh adapters with LoRA, else those of
        `init_model(cfg, seed)`."""
        if self.lora:
            shapes, rank = self.tree.shapes, self.tc.lora_rank
            params = jax.jit(lambda k: lora_mod.init_adapters(k, shapes, rank),
                             out_shardings=self.param_shardings)(jax.random.key(seed))
        elif start is not None:
            params = self.place(start)
        else:
            key = (self.cfg, self.mesh, tuple(sorted(self.param_shardings.items())))
            if key not in _INIT_FNS:  # compiling the initialisers takes seconds: share them
                cfg = self.cfg

                def make(rng):
                    return ParamTree.flat(Transformer(cfg, rngs=nnx.Rngs(params=rng)))

                _INIT_FNS[key] = jax.jit(make, out_shardings=self.param_shardings)
            params = _INIT_FNS[key](jax.random.key(seed))
        return params, jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)

    def model_params(self, params, base) -> dict[str, jax.Array]:
        """The model's weights: the trained ones, or the base with the adapters merged."""
        return lora_mod.merge(base, params, self.tc.lora_scale) if self.lora else params

    @property
    def n_params(self) -> int:
        """Parameters of the model (not of the adapters)."""
        return sum(math.prod(s) for s, _ in self.tree.shapes.values())

    @property
    def n_trained(self) -> int:
        """Parameters the optimizer updates."""
        return sum(math.prod(s) for s, _ in self.shapes.values())

    # -- steps --------------------------------------------------------------------------
    def _loss(self, params, tokens_bt, base, positions_bt=None):
        model = self.tree.model(self.model_params(params, base))
        return jnp.mean(token_nll(model, tokens_bt[:, :-1], tokens_bt[:, 1:],
                                  positions_bt=positions_bt))

    def _train_step(self, params, opt_state, batch_abt, base, positions_abt=None):
        grad_fn = jax.value_and_grad(self._loss)
        if batch_abt.shape[0] == 1:
            pos = None if positions_abt is None else positions_abt[0]
            loss, grads = grad_fn(params, batch_abt[0], base, pos)
        else:
            def micro(acc, xs):
                tokens_bt, positions_bt = xs
                loss, grads = grad_fn(params, tokens_bt, base, positions_bt)
                return jax.tree.map(jnp.add, acc, grads), loss

            zeros = jax.tree.map(jnp.zeros_like, params)
            grads, losses = jax.lax.scan(micro, zeros, (batch_abt, positions_abt))
            grads = jax.tree.map(lambda g: g / batch_abt.shape[0], grads)
            loss = jnp.mean(losses)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": grad_norm}

    def _eval_step(self, params, base, inputs_bt, targets_bt, mask_bt):
        model = self.tree.model(self.model_params(params, base))
        nll = token_nll(model, inputs_bt, targets_bt)
        return jnp.sum(nll * mask_bt)

    def put_batch(self, batch_bt: np.ndarray) -> jax.Array:
        """A (batch_size, T+1) host batch (or (batch_size, T) position ids) as the global
        (grad_accum, micro, T+1) array."""
        a = self.tc.grad_accum
        host = np.ascontiguousarray(batch_bt.reshape(a, batch_bt.shape[0] // a, -1))
        return jax.make_array_from_callback(host.shape, self.batch_sharding,
                                            lambda idx: host[idx])

    def step(self, params, opt_state, batch_bt: np.ndarray,
             positions_bt: np.ndarray | None = None):
        """One optimizer step on a host batch; params and opt_state are donated.
        `positions_bt`: (batch_size, T) int32 position ids of the inputs (PoSE); None: the
        plain 0 .. T-1 (the step without the argument)."""
        if positions_bt is None:
            return self._step(params, opt_state, self.put_batch(batch_bt), self.base)
        return self._step_pos(params, opt_state, self.put_batch(batch_bt), self.base,
                              self.put_batch(np.asarray(positions_bt, np.int32)))

    def compile(self, params, opt_state) -> float:
        """Compile the train step ahead of time (the one with position ids when the run
        sets a target context); returns seconds taken."""
        t0 = time.perf_counter()
        shape = (self.tc.grad_accum, self.micro, self.tc.seq_len + 1)
        tokens = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding)
        if self.tc.target_context is None:
            self._step.lower(params, opt_state, tokens, self.base).compile()
        else:
            positions = jax.ShapeDtypeStruct(shape[:2] + (self.tc.seq_len,), jnp.int32,
                                             sharding=self.batch_sharding)
            self._step_pos.lower(params, opt_state, tokens, self.base, positions).compile()
        return time.perf_counter() - t0

    def evaluate(self, params, es: data_mod.EvalSet) -> dict[str, float]:
        """Validation loss (nats/token) and bits per byte over an EvalSet."""
        if es.n_tokens == 0:
            return {"val_loss": float("nan"), "val_bpb": float("nan"), "val_docs": 0}
        b = max(self.eval_batch, self.n_dev)
        parts = []
        for start in range(0, len(es.inputs), b):
            rows = [a[start:start + b] for a in (es.inputs, es.targets, es.mask)]
            pad = b - len(rows[0])
            if pad:
                rows = [np.concatenate([r, np.zeros((pad,) + r.shape[1:], r.dtype)])
                        for r in rows]
            arrs = [jax.make_array_from_callback(r.shape, self.eval_sharding,
                                                 lambda idx, r=r: r[idx]) for r in rows]
            parts.append(self._eval(params, self.base, *arrs))
            if self.n_dev > 1:
                # The CPU runtime may run independent programs at once; two eval batches
                # whose all-reduces wait for each other's devices then deadlock. One batch
                # in flight at a time keeps every device on the same program.
                parts[-1].block_until_ready()
        total = float(np.sum([float(p) for p in parts], dtype=np.float64))
        return {"val_loss": total / es.n_tokens,
                "val_bpb": total / (es.n_bytes * math.log(2)),
                "val_docs": es.n_docs, "val_tokens": es.n_tokens, "val_bytes": es.n_bytes}

    def host_params(self, params) -> dict[str, np.ndarray]:
        """The model's parameters as host NumPy arrays (gathered from every host when
        multi-process); with LoRA, the base weights with the adapters merged."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            params = multihost_utils.process_allgather(params, tiled=True)
        host = {n: np.asarray(v) for n, v in params.items()}
        if self.lora:
            return lora_mod.merge_host(self._base_host, host, self.tc.lora_scale)
        return host
