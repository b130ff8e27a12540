"""The training loop: optax AdamW, one jitted step sharded over a device mesh, orbax resume.

Run directory (``out``)::

    <out>/config.json, tokenizer.model,    the latest exported model: a spark checkpoint,
          params/, manifest.json            so spark_model.load(out) works (see _export)
    <out>/metrics.jsonl                     one JSON object per log / eval interval
    <out>/loss.png                          loss and bits-per-byte curves (end of run)
    <out>/training/run.json                 the run's settings: marks a training directory
    <out>/training/tokenizer.model          the tokenizer this run trains with
    <out>/training/checkpoints/<step>/      orbax CheckpointManager: params, optimizer
                                            state (item "state") and step + data position
                                            (item "data"); the last `keep` are kept

The exported model is rewritten at every checkpoint save and at the end; it is never
mixed up with the orbax state, and a directory that is not a training run is never written.

Sharding: a 1-D `jax.sharding.Mesh` over all devices with axis "data". Each batch is split
over it (data parallel); parameters and optimizer state are replicated, or with ``fsdp``
sharded over the same axis along their largest dimension that the device count divides
(parameters it does not divide stay replicated). XLA inserts the all-gathers and
reduce-scatters from the `in_shardings`/`out_shardings` of the one jitted step.

Multi-host: call ``jax.distributed.initialize()`` before anything else touches JAX (the CLI
does it with ``--distributed``); `jax.devices()` then lists every host's devices, the mesh
spans them, and every process runs this same code: each builds the same global batch from
the same cache and `jax.make_array_from_callback` keeps only its own shards. The run
directory must be on a filesystem all hosts share; orbax writes the checkpoints
collectively, process 0 writes the exported model, metrics and plot.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from spark_model import checkpoint
from spark_model.config import ModelConfig
from spark_model.transformer import Transformer, abstract_model
from train import corpus as corpus_mod
from train import data as data_mod
from train.loss import token_nll

RUN_DIR = "training"
RUN_FILE = "run.json"
STATE_DIR = "checkpoints"
RUN_TOKENIZER = "tokenizer.model"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
RUN_FORMAT = "spark-training-run"
EXPORT_FILES = (checkpoint.CONFIG_FILE, checkpoint.TOKENIZER_FILE, checkpoint.PARAMS_DIR)
KILL_ENV = "SPARK_TRAIN_KILL_AT_STEP"  # tests: SIGKILL self right after this step's save


class TrainError(RuntimeError):
    """A training run that cannot start or continue; the message says why, in one line."""


class SettingsError(ValueError):
    """Settings that cannot work (a usage error)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run. Fields in RUN_FIELDS are fixed once a run starts."""

    preset: str = "tiny"
    overrides: tuple[tuple[str, Any], ...] = ()  # ModelConfig fields, e.g. (("d_model", 32),)
    vocab_size: int | None = None  # None: the preset's
    data: tuple[str, ...] = ()  # sources (directories, .jsonl, files); () = the stdlib
    val_permille: int = corpus_mod.DEFAULT_VAL_PERMILLE
    seq_len: int = 512
    batch_size: int = 8  # sequences per optimizer step (all devices, all micro-batches)
    steps: int = 2000
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    warmup: int = 100
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip: float = 1.0
    seed: int = 0
    bf16: bool = False  # bf16 compute, f32 master weights
    # Free to change when resuming:
    grad_accum: int = 1  # micro-batches per step (batch_size / grad_accum sequences each)
    fsdp: bool = False
    log_every: int = 10
    eval_every: int = 250  # 0: only at the end
    eval_tokens: int = 65_536  # validation tokens scored at each interval (whole files)
    save_every: int = 250  # 0: only at the end
    keep: int = 3

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        """The model trained (f32 compute; `compute_config` applies bf16)."""
        vocab = vocab_size or self.vocab_size
        extra = {"vocab_size": vocab} if vocab else {}
        return ModelConfig.preset(self.preset, **dict(self.overrides), **extra)

    def to_json_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["overrides"] = {k: v for k, v in self.overrides}
        d["data"] = list(self.data)
        return d

    @classmethod
    def from_json_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["overrides"] = tuple(sorted(d.get("overrides", {}).items()))
        d["data"] = tuple(d.get("data", ()))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# Settings a resumed run must share with the run it continues (--steps may only grow).
RUN_FIELDS = ("preset", "overrides", "vocab_size", "data", "val_permille", "seq_len",
              "batch_size", "lr", "min_lr_ratio", "warmup", "weight_decay", "b1",
              "b2", "clip", "seed", "bf16")


def validate(tc: TrainConfig) -> None:
    """Raise SettingsError (a usage error) for settings that cannot work."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise SettingsError(msg)
    need(tc.steps >= 1, f"--steps must be at least 1, got {tc.steps}")
    need(tc.batch_size >= 1, f"--batch-size must be at least 1, got {tc.batch_size}")
    need(tc.seq_len >= 2, f"--seq-len must be at least 2, got {tc.seq_len}")
    need(tc.grad_accum >= 1, f"--grad-accum must be at least 1, got {tc.grad_accum}")
    need(tc.batch_size % tc.grad_accum == 0,
         f"--batch-size ({tc.batch_size}) must be a multiple of --grad-accum ({tc.grad_accum})")
    need(math.isfinite(tc.lr) and tc.lr > 0, f"--lr must be positive, got {tc.lr}")
    need(0 <= tc.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {tc.min_lr_ratio}")
    need(0 <= tc.warmup < tc.steps,
         f"--warmup must be in [0, --steps) = [0, {tc.steps}), got {tc.warmup}")
    need(tc.weight_decay >= 0, f"--weight-decay must be >= 0, got {tc.weight_decay}")
    need(tc.clip > 0, f"--clip must be positive, got {tc.clip}")
    need(tc.log_every >= 1, f"--log-every must be at least 1, got {tc.log_every}")
    need(tc.eval_every >= 0, f"--eval-every must be >= 0, got {tc.eval_every}")
    need(tc.eval_tokens >= 1, f"--eval-tokens must be at least 1, got {tc.eval_tokens}")
    need(tc.save_every >= 0, f"--save-every must be >= 0, got {tc.save_every}")
    need(tc.keep >= 1, f"--keep must be at least 1, got {tc.keep}")
    need(0 <= tc.val_permille < 1000,
         f"--val-permille must be in [0, 1000), got {tc.val_permille}")
    if tc.vocab_size is not None:
        from spark_model.tokenizer import MIN_VOCAB_SIZE
        need(tc.vocab_size >= MIN_VOCAB_SIZE,
             f"--vocab-size must be at least {MIN_VOCAB_SIZE}, got {tc.vocab_size}")
        need(tc.vocab_size <= 65536 * 4, f"--vocab-size {tc.vocab_size} is implausibly large")
    cfg = tc.model_config()  # ConfigError (a ValueError) for bad presets/overrides
    need(tc.seq_len <= cfg.max_seq_len,
         f"--seq-len {tc.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")


# ---- parameters as a flat dict --------------------------------------------------------

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


def decay_mask(names: Sequence[str], shapes: dict[str, tuple]) -> dict[str, bool]:
    """Weight decay on matrices only: not on norm scales (1-D) nor the token embedding."""
    return {n: len(shapes[n][0]) >= 2 and n != "embed" for n in names}


def make_schedule(tc: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=tc.warmup, decay_steps=tc.steps,
        end_value=tc.lr * tc.min_lr_ratio)


def make_optimizer(tc: TrainConfig, mask: dict[str, bool]) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(tc.clip),
        optax.adamw(make_schedule(tc), b1=tc.b1, b2=tc.b2, eps=1e-8,
                    weight_decay=tc.weight_decay, mask=mask))


# ---- sharding -------------------------------------------------------------------------

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


_INIT_FNS: dict[Any, Callable] = {}


class Trainer:
    """The jitted train and eval steps of one (model config, settings, mesh)."""

    def __init__(self, cfg: ModelConfig, tc: TrainConfig, mesh: Mesh | None = None):
        self.cfg = cfg  # the exported (f32) config
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
        self.mask = decay_mask(self.tree.names, self.tree.shapes)
        self.schedule = make_schedule(tc)
        self.tx = make_optimizer(tc, self.mask)
        shard = self._spec if tc.fsdp else (lambda shape: P())
        self.param_shardings = {n: NamedSharding(self.mesh, shard(self.tree.shapes[n][0]))
                                for n in self.tree.names}
        abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params())
        self.opt_shardings = jax.tree.map(
            lambda x: NamedSharding(self.mesh, shard(tuple(x.shape))), abstract_opt)
        self.batch_sharding = NamedSharding(self.mesh, P(None, "data", None))
        self.eval_sharding = NamedSharding(self.mesh, P("data", None))
        self.replicated = NamedSharding(self.mesh, P())
        self.eval_batch = self.micro
        self._step = jax.jit(
            self._train_step,
            in_shardings=(self.param_shardings, self.opt_shardings, self.batch_sharding),
            out_shardings=(self.param_shardings, self.opt_shardings, self.replicated),
            donate_argnums=(0, 1))
        self._eval = jax.jit(
            self._eval_step,
            in_shardings=(self.param_shardings, self.eval_sharding, self.eval_sharding,
                          self.eval_sharding),
            out_shardings=self.replicated)

    def _spec(self, shape: tuple[int, ...]) -> P:
        return fsdp_spec(shape, self.n_dev)

    # -- state --------------------------------------------------------------------------
    def abstract_params(self) -> dict[str, jax.ShapeDtypeStruct]:
        return {n: jax.ShapeDtypeStruct(s, d) for n, (s, d) in self.tree.shapes.items()}

    def abstract_state(self) -> dict[str, Any]:
        """Shapes, dtypes and shardings of {"params", "opt_state"} (the orbax target)."""
        params = {n: jax.ShapeDtypeStruct(s, d, sharding=self.param_shardings[n])
                  for n, (s, d) in self.tree.shapes.items()}
        opt = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                           jax.eval_shape(self.tx.init, self.abstract_params()),
                           self.opt_shardings)
        return {"params": params, "opt_state": opt}

    def init(self, seed: int) -> tuple[dict[str, jax.Array], Any]:
        """Fresh parameters (those of `init_model(cfg, seed)`) and optimizer state, placed
        directly in their shardings."""
        key = (self.cfg, self.mesh, tuple(sorted(self.param_shardings.items())))
        if key not in _INIT_FNS:  # compiling the initialisers takes seconds: share them
            cfg = self.cfg

            def make(rng):
                return ParamTree.flat(Transformer(cfg, rngs=nnx.Rngs(params=rng)))

            _INIT_FNS[key] = jax.jit(make, out_shardings=self.param_shardings)
        params = _INIT_FNS[key](jax.random.key(seed))
        return params, jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)

    # -- steps --------------------------------------------------------------------------
    def _loss(self, params, tokens_bt):
        model = self.tree.model(params)
        return jnp.mean(token_nll(model, tokens_bt[:, :-1], tokens_bt[:, 1:]))

    def _train_step(self, params, opt_state, batch_abt):
        grad_fn = jax.value_and_grad(self._loss)
        if batch_abt.shape[0] == 1:
            loss, grads = grad_fn(params, batch_abt[0])
        else:
            def micro(acc, tokens_bt):
                loss, grads = grad_fn(params, tokens_bt)
                return jax.tree.map(jnp.add, acc, grads), loss

            zeros = jax.tree.map(jnp.zeros_like, params)
            grads, losses = jax.lax.scan(micro, zeros, batch_abt)
            grads = jax.tree.map(lambda g: g / batch_abt.shape[0], grads)
            loss = jnp.mean(losses)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": grad_norm}

    def _eval_step(self, params, inputs_bt, targets_bt, mask_bt):
        model = self.tree.model(params)
        nll = token_nll(model, inputs_bt, targets_bt)
        return jnp.sum(nll * mask_bt)

    def put_batch(self, batch_bt: np.ndarray) -> jax.Array:
        """A (batch_size, T+1) host batch as the global (grad_accum, micro, T+1) array."""
        a = self.tc.grad_accum
        host = np.ascontiguousarray(batch_bt.reshape(a, batch_bt.shape[0] // a, -1))
        return jax.make_array_from_callback(host.shape, self.batch_sharding,
                                            lambda idx: host[idx])

    def step(self, params, opt_state, batch_bt: np.ndarray):
        """One optimizer step on a host batch; params and opt_state are donated."""
        return self._step(params, opt_state, self.put_batch(batch_bt))

    def compile(self, params, opt_state) -> float:
        """Compile the train step ahead of time; returns seconds taken."""
        t0 = time.perf_counter()
        shape = (self.tc.grad_accum, self.micro, self.tc.seq_len + 1)
        self._step.lower(params, opt_state,
                         jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding)
                         ).compile()
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
            parts.append(self._eval(params, *arrs))
        total = float(np.sum([float(p) for p in parts], dtype=np.float64))
        return {"val_loss": total / es.n_tokens,
                "val_bpb": total / (es.n_bytes * math.log(2)),
                "val_docs": es.n_docs, "val_tokens": es.n_tokens, "val_bytes": es.n_bytes}

    def host_params(self, params) -> dict[str, np.ndarray]:
        """Parameters as host NumPy arrays (gathered from every host when multi-process)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            params = multihost_utils.process_allgather(params, tiled=True)
        return {n: np.asarray(v) for n, v in params.items()}


# ---- run directory --------------------------------------------------------------------

def _quiet() -> None:
    for name in ("absl", "orbax", "jax._src.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def is_training_dir(out: Path) -> bool:
    return (out / RUN_DIR / RUN_FILE).is_file()


def _check_out(out: Path, resume: bool) -> dict | None:
    """Check --out against --resume; return the stored run.json when resuming."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} exists and is not a directory")
    if resume:
        if not is_training_dir(out):
            raise TrainError(f"--resume: no training checkpoint in {out} "
                             f"({RUN_DIR}/{RUN_FILE} not found); start a run without --resume")
        try:
            stored = json.loads((out / RUN_DIR / RUN_FILE).read_text())
            if stored.get("format") != RUN_FORMAT:
                raise ValueError
        except ValueError:
            raise TrainError(f"{out / RUN_DIR / RUN_FILE} is damaged; cannot resume") from None
        return stored
    if is_training_dir(out):
        raise TrainError(f"--out {out} already holds a training run; pass --resume to "
                         "continue it or choose another --out")
    if out.is_dir() and any(out.iterdir()):
        raise TrainError(f"--out {out} exists and is not a training run directory; "
                         "choose a new or empty directory")
    return None


def check_resume_settings(stored: TrainConfig, tc: TrainConfig, out: Path) -> None:
    """A resumed run keeps every RUN_FIELDS setting; its --steps may grow (an extension:
    the cosine schedule is then recomputed over the new total)."""
    if tc.steps < stored.steps:
        raise TrainError(f"{out} holds a run of {stored.steps} steps; --steps {tc.steps} would "
                         "shorten it (a resumed run may only be extended)")
    for f in RUN_FIELDS:
        old, new = getattr(stored, f), getattr(tc, f)
        if old != new:
            show = (lambda v: dict(v)) if f == "overrides" else (lambda v: v)
            raise TrainError(f"{out} holds a run with {f}={show(old)!r}, but this command asks "
                             f"for {f}={show(new)!r}; resume with the same settings or "
                             "choose another --out")


def _record_extension(out: Path, stored: dict, steps: int, lead: bool, say) -> dict:
    """Rewrite run.json for a run extended to `steps`, keeping the history of its lengths."""
    before = stored["settings"]["steps"]
    say(f"extending the run from {before} to {steps} steps: the learning rate now follows "
        f"the cosine over {steps} steps from the resumed step on")
    stored = {**stored, "settings": {**stored["settings"], "steps": steps},
              "extensions": [*stored.get("extensions", []), {"from": before, "to": steps}]}
    if lead:
        tmp = out / RUN_DIR / f".{RUN_FILE}.tmp"
        tmp.write_text(json.dumps(stored, indent=2))
        os.replace(tmp, out / RUN_DIR / RUN_FILE)
    _sync("spark-train-extended")
    return stored


def _export(out: Path, host_params: dict[str, np.ndarray], cfg: ModelConfig, tokenizer,
            extra: dict) -> None:
    """Write the model as a spark checkpoint into the run directory itself.

    checkpoint.save writes a complete checkpoint into a fresh directory inside `out`; its
    files then replace the run directory's: manifest.json is removed first and moved in
    last, so at every instant the directory either loads as one consistent model or
    reports a missing manifest (never a mix of two exports)."""
    model = checkpoint.model_from_flat(cfg, host_params)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        new = checkpoint.save(staging / "model", model, tokenizer, extra=extra)
        (out / checkpoint.MANIFEST_FILE).unlink(missing_ok=True)
        for name in EXPORT_FILES:
            if (out / name).exists():
                (out / name).rename(staging / f"old-{name}")
            (new / name).rename(out / name)
        (new / checkpoint.MANIFEST_FILE).rename(out / checkpoint.MANIFEST_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---- metrics --------------------------------------------------------------------------

class Metrics:
    """Appends JSON lines to <out>/metrics.jsonl (process 0 only)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int):
        self.path = path
        self.enabled = enabled
        if enabled and resume_step and path.exists():
            # Drop what a killed run logged after its last checkpoint: it is redone.
            keep = []
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("step", 0) <= resume_step:
                    keep.append(line)
            path.write_text("".join(l + "\n" for l in keep))
        elif enabled and not resume_step:
            path.write_text("")

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def plot_metrics(metrics_path: Path, png_path: Path) -> bool:
    """Loss curves as a PNG: train loss and validation loss (left), validation bits per
    byte (right); interval evals (a fixed subset of files) and the final full-split eval
    are drawn apart, since they score different files."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train, sub, full = [], [], []
    for line in metrics_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("kind") == "train":
            train.append((rec["step"], rec["loss"]))
        elif rec.get("kind") == "eval":
            (full if rec.get("full") else sub).append(
                (rec["step"], rec["val_loss"], rec["val_bpb"]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax1.plot(*zip(*train), lw=1, label="train loss")
    for series, style, color, label in ((sub, "o-", "C1", "validation subset"),
                                        (full, "*", "C3", "full validation split")):
        if series:
            steps = [v[0] for v in series]
            for ax, col in ((ax1, 1), (ax2, 2)):
                ax.plot(steps, [v[col] for v in series], style, color=color,
                        ms=10 if style == "*" else 4, label=label)
    ax1.set_xlabel("step")
    ax1.set_ylabel("cross-entropy (nats/token)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("validation bits per byte")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True


# ---- the run --------------------------------------------------------------------------

def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def prepare_data(tc: TrainConfig, tokenizer=None, cache_dir=None, say=_say):
    """Corpus -> split -> tokenizer (trained on the training split unless given) -> cache."""
    docs, stats = corpus_mod.load_corpus(tc.data or None)
    train_docs, val_docs = corpus_mod.split_corpus(docs, tc.val_permille)
    what = ", ".join(tc.data) if tc.data else "the Python standard library"
    say(f"corpus: {what}: {stats.summary()}; {len(train_docs)} train / "
        f"{len(val_docs)} validation")
    if not train_docs:
        raise TrainError(f"empty corpus: no usable training text in {what} "
                         f"({stats.summary()})")
    vocab = tc.vocab_size or ModelConfig.preset(tc.preset).vocab_size
    if tokenizer is None:
        t0 = time.perf_counter()
        from spark_model.tokenizer import TokenizerError
        try:
            tokenizer = data_mod.train_or_load_tokenizer(train_docs, vocab, cache_dir)
        except TokenizerError as e:
            raise TrainError(f"cannot train the tokenizer: {e}") from None
        say(f"tokenizer: vocab {tokenizer.vocab_size} ({time.perf_counter() - t0:.1f}s)")
    t0 = time.perf_counter()
    data, built = data_mod.build_token_cache(train_docs, val_docs, tokenizer, tc.seq_len,
                                             cache_dir)
    say(f"tokens: {len(data.train):,} train in {data.n_sequences:,} sequences of "
        f"{tc.seq_len}, {len(data.val):,} validation ({'built' if built else 'cached'} "
        f"{data.path}, {time.perf_counter() - t0:.1f}s)")
    info = {"corpus": stats.as_dict(), "train_docs": len(train_docs),
            "val_docs": len(val_docs), "train_fingerprint": corpus_mod.fingerprint(train_docs),
            "val_fingerprint": corpus_mod.fingerprint(val_docs)}
    return tokenizer, data, info


def train(tc: TrainConfig, out: str | os.PathLike, *, resume: bool = False,
          cache_dir: str | os.PathLike | None = None, progress: bool | None = None,
          mesh: Mesh | None = None) -> dict:
    """Train (or resume) a run in `out`; returns a summary dict.

    Raises TrainError (runtime problems) or ValueError (bad settings) with one-line messages.
    """
    _quiet()
    import orbax.checkpoint as ocp

    out = Path(out).expanduser().absolute()
    validate(tc)
    stored = _check_out(out, resume)
    lead = jax.process_index() == 0
    _sync("spark-train-checked")  # every process has looked at `out` before anyone writes
    say = _say

    tokenizer = None
    if stored is not None:
        check_resume_settings(TrainConfig.from_json_dict(stored["settings"]), tc, out)
        from spark_model.tokenizer import Tokenizer
        tokenizer = Tokenizer.load(out / RUN_DIR / RUN_TOKENIZER)
    tokenizer, data, info = prepare_data(tc, tokenizer, cache_dir, say)
    if stored is not None:
        for k in ("train_fingerprint", "val_fingerprint"):
            if stored["data"].get(k) != info[k]:
                raise TrainError(f"the corpus changed since the run in {out} started "
                                 f"({k.split('_')[0]} documents differ); cannot resume exactly")
    cfg = tc.model_config(tokenizer.vocab_size)
    trainer = Trainer(cfg, tc, mesh)
    if stored is not None and tc.steps != stored["settings"]["steps"]:
        stored = _record_extension(out, stored, tc.steps, lead, say)

    manager_dir = out / RUN_DIR / STATE_DIR
    if stored is None and lead:
        (out / RUN_DIR).mkdir(parents=True, exist_ok=True)
        tokenizer.save(out / RUN_DIR / RUN_TOKENIZER)
        run_info = {"format": RUN_FORMAT, "settings": tc.to_json_dict(),
                    "model": cfg.to_dict(), "data": info}
        tmp = out / RUN_DIR / f".{RUN_FILE}.tmp"
        tmp.write_text(json.dumps(run_info, indent=2))
        os.replace(tmp, out / RUN_DIR / RUN_FILE)
    _sync("spark-train-run-written")
    options = ocp.CheckpointManagerOptions(max_to_keep=tc.keep, create=True)
    manager = ocp.CheckpointManager(manager_dir, options=options)
    try:
        return _run(tc, out, trainer, tokenizer, data, manager, resume, progress, lead, say)
    finally:
        manager.close()


def _run(tc, out, trainer, tokenizer, data, manager, resume, progress, lead, say) -> dict:
    import orbax.checkpoint as ocp

    start = 0
    position = 0
    latest = manager.latest_step() if resume else None
    if resume and latest is None:
        # The run stopped before its first save: starting over is the exact continuation.
        say(f"no checkpoint saved yet in {out / RUN_DIR / STATE_DIR}; starting from step 0")
    if latest is not None:
        try:
            restored = manager.restore(latest, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(trainer.abstract_state()),
                data=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - orbax raises many types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainError(f"cannot restore step {latest} from "
                             f"{out / RUN_DIR / STATE_DIR}: {first}") from e
        params, opt_state = restored.state["params"], restored.state["opt_state"]
        meta = restored.data
        start, position = int(meta["step"]), int(meta["data"]["position"])
        if meta["data"]["n_sequences"] != data.n_sequences:
            raise TrainError(f"the checkpoint in {out} was made with "
                             f"{meta['data']['n_sequences']} packed sequences, the data now has "
                             f"{data.n_sequences}; cannot resume exactly")
        say(f"resumed from step {start} (data position {position})")
    else:
        params, opt_state = trainer.init(tc.seed)
    it = data_mod.BatchIterator(data, tc.batch_size, tc.seed, position)
    metrics = Metrics(out / METRICS_FILE, lead, start)
    eval_small = data_mod.eval_set(data, tc.eval_tokens)
    eval_full = data_mod.eval_set(data)
    tokens_per_step = tc.batch_size * tc.seq_len
    compile_s = trainer.compile(params, opt_state)
    say(f"model: {sum(math.prod(s) for s, _ in trainer.tree.shapes.values()):,} parameters, "
        f"{trainer.n_dev} device(s), {'FSDP' if tc.fsdp else 'data parallel'}; "
        f"compiled the step in {compile_s:.1f}s")
    extra = {"train": {"steps": tc.steps, "seq_len": tc.seq_len, "train_seq_len": tc.seq_len,
                       "preset": tc.preset, "bf16": tc.bf16}}
    kill_at = int(os.environ.get(KILL_ENV, "0") or 0)

    def save(step: int) -> None:
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            data=ocp.args.JsonSave({"step": step, "data": it.state(),
                                    "tokens_seen": step * tokens_per_step})), force=True)
        host = trainer.host_params(params)  # a collective when multi-process
        if lead:
            _export(out, host, trainer.cfg, tokenizer, {**extra, "step": step})
        if kill_at and step == kill_at:
            manager.wait_until_finished()
            os.kill(os.getpid(), signal.SIGKILL)

    def do_eval(step: int, es: data_mod.EvalSet, full: bool) -> dict:
        t0 = time.perf_counter()
        r = trainer.evaluate(params, es)
        rec = {"kind": "eval", "step": step, "full": full, **r,
               "eval_s": round(time.perf_counter() - t0, 3)}
        metrics.write(rec)
        return rec

    from tqdm import tqdm
    show_bar = progress if progress is not None else sys.stderr.isatty()
    bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=not (show_bar and lead), file=sys.stderr)
    pending: list[jax.Array] = []
    t_last, step_last = time.perf_counter(), start
    last_train: dict = {}
    last_eval: dict = {}
    t_begin = time.perf_counter()
    try:
        for step in range(start + 1, tc.steps + 1):
            batch = it.next()
            params, opt_state, m = trainer.step(params, opt_state, batch)
            pending.append(m["loss"])
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                losses = [float(x) for x in pending]  # waits for the device
                now = time.perf_counter()
                last_train = {
                    "kind": "train", "step": step, "loss": float(np.mean(losses)),
                    "lr": float(trainer.schedule(step - 1)), "grad_norm": float(m["grad_norm"]),
                    "tokens_per_s": round((step - step_last) * tokens_per_step
                                          / (now - t_last), 1),
                    "epoch": round(it.epoch, 4), "tokens": step * tokens_per_step,
                    "elapsed_s": round(now - t_begin, 2)}
                metrics.write(last_train)
                pending, t_last, step_last = [], now, step
                bar.set_postfix(loss=f"{last_train['loss']:.3f}",
                                tok_s=f"{last_train['tokens_per_s']:.0f}")
                if bar.disable:
                    say(f"step {step}/{tc.steps} loss {last_train['loss']:.4f} "
                        f"lr {last_train['lr']:.2e} {last_train['tokens_per_s']:.0f} tok/s "
                        f"epoch {last_train['epoch']:.3f}")
            if tc.eval_every and step % tc.eval_every == 0 and step != tc.steps:
                last_eval = do_eval(step, eval_small, False)
                line = (f"step {step}: val loss {last_eval['val_loss']:.4f}, val bpb "
                        f"{last_eval['val_bpb']:.4f} ({last_eval['val_docs']} files)")
                bar.write(line, file=sys.stderr) if not bar.disable else say(line)
                t_last = time.perf_counter()  # eval time is not training throughput
            if (tc.save_every and step % tc.save_every == 0) or step == tc.steps:
                save(step)
                t_last = time.perf_counter()
    finally:
        bar.close()
        manager.wait_until_finished()
    final = do_eval(tc.steps, eval_full, True)  # the whole validation split
    say(f"done: step {tc.steps}, validation loss {final['val_loss']:.4f} nats/token, "
        f"{final['val_bpb']:.4f} bits/byte on {final['val_docs']} held-out files")
    plotted = False
    host = trainer.host_params(params)
    if lead:
        _export(out, host, trainer.cfg, tokenizer,
                {**extra, "step": tc.steps, "val_bpb": final["val_bpb"],
                 "val_loss": final["val_loss"]})
        plotted = plot_metrics(out / METRICS_FILE, out / PLOT_FILE)
        if not plotted:
            say("note: matplotlib is not installed; no loss.png written")
    return {"out": str(out), "step": tc.steps, "start_step": start, "final": final,
            "last_train": last_train, "compile_s": compile_s, "plotted": plotted,
            "params": params}
