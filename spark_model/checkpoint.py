"""The checkpoint format: one directory that holds everything a model needs.

    <dir>/config.json      {"format": "spark-checkpoint", "version": 1, "model": {...}}
    <dir>/tokenizer.model  the SentencePiece model proto, or
    <dir>/tokenizer.json + tokenizer_meta.json   an imported model's BPE tokenizer
    <dir>/params/          parameters, saved with orbax-checkpoint (flat names -> arrays)
    <dir>/manifest.json    size and SHA-256 of every file above, written last

A packed parameter (spark_model/packing.py) is stored as its GGUF block bytes, one uint8
array (N, K/32 * block bytes) under its name, and config.json's "packed" maps its name to its
format; such a checkpoint is version 2 (one with only float parameters stays version 1, so
older releases still read it). docs/checkpoint-format.md describes the layout.

The manifest makes damage nameable: a missing, truncated or altered file is reported by
its path before orbax ever reads it. Saving writes into a temporary sibling directory
and renames it into place, so an interrupted save never destroys an existing checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from spark_model import packing, quant, tokenizers_io
from spark_model.atomic import move_into_place
from spark_model.config import ConfigError, ModelConfig
from spark_model.transformer import Transformer, abstract_model
from spark_model.versioned_json import read_versioned_json

FORMAT = "spark-checkpoint"
VERSION = 1  # float parameters only
PACKED_VERSION = 2  # some parameters packed, named in config.json's "packed"
READ_VERSIONS = (VERSION, PACKED_VERSION)
PACKED_KEY = "packed"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"  # a SentencePiece tokenizer (see spark_model.tokenizers_io)
TOKENIZER_FILES = tokenizers_io.TOKENIZER_FILES  # every file a tokenizer may own
PARAMS_DIR = "params"
MANIFEST_FILE = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be read or written; the message says why."""


# ---- parameter naming ------------------------------------------------------------------

def param_name(path: tuple[Any, ...]) -> str:
    """A pytree path as the dotted parameter name every tool uses ('blocks.0.attn.q').

    Dict keys and sequence indices become parts; attribute steps (nnx.Variable's
    '.value') are not part of a parameter's name and are dropped.
    """
    parts = (getattr(k, "key", getattr(k, "idx", None)) for k in path)
    return ".".join(str(p) for p in parts if p is not None)


def flat_params(model: Transformer) -> dict[str, Any]:
    """Parameters by dotted path, e.g. 'blocks.0.attn.q' -> array (D, N, H), or a
    `quant.PackedWeight` (N, K) for a packed one (spark_model/packing.py)."""
    pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return {param_name(p): leaf for p, leaf in
            jax.tree_util.tree_leaves_with_path(pure, is_leaf=packing.is_packed)}


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's Spark shape (float layout), from the config alone."""
    return {name: tuple(spec.shape) for name, spec in flat_params(abstract_model(cfg)).items()}


def _on_device(value: Any, dtype) -> Any:
    if packing.is_packed(value):
        return packing.map_arrays(value, jax.numpy.asarray)
    return jax.numpy.asarray(value, dtype)


def model_from_flat(cfg: ModelConfig, flat: dict[str, Any]) -> Transformer:
    """Build a model of `cfg` whose parameters are `flat` (names and shapes must match; a
    packed weight matrix must have its parameter's (N, K), see spark_model/packing.py)."""
    abstract = abstract_model(cfg)
    graphdef, state = nnx.split(abstract)
    expected = {name: leaf for name, leaf in flat_params(abstract).items()}
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    if missing or extra:
        raise CheckpointError(f"parameters do not match the config: missing {missing[:5]}, "
                              f"unexpected {extra[:5]}")
    for name, spec in expected.items():
        value = flat[name]
        if packing.is_packed(value):
            if not packing.packable(name):
                raise CheckpointError(f"parameter {name} cannot be packed (only the weight "
                                      f"matrices can)")
            want = packing.matrix_shape(name, tuple(spec.shape))
            if tuple(value.shape) != want:
                raise CheckpointError(f"packed parameter {name} is a {value.shape} matrix, "
                                      f"the config needs {want} (its shape {tuple(spec.shape)})")
        elif tuple(value.shape) != tuple(spec.shape):
            raise CheckpointError(f"parameter {name} has shape {tuple(value.shape)}, "
                                  f"the config needs {tuple(spec.shape)}")
    pure = nnx.to_pure_dict(state)
    pure = jax.tree_util.tree_map_with_path(
        lambda p, spec: _on_device(flat[param_name(p)], spec.dtype), pure)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


# ---- saving ----------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(root: Path) -> None:
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST_FILE:
            files[p.relative_to(root).as_posix()] = {"bytes": p.stat().st_size,
                                                      "sha256": _sha256(p)}
    (root / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1, sort_keys=True))


def _quiet_orbax() -> None:
    # orbax logs every save/restore step at INFO/WARNING through absl; users need none of it.
    for name in ("absl", "orbax", "jax._src.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def save(path: str | os.PathLike, model: Transformer, tokenizer, *,
         overwrite: bool = False, extra: dict[str, Any] | None = None) -> Path:
    """Write `model` and `tokenizer` as a checkpoint directory at `path`.

    An existing non-empty directory is replaced only with overwrite=True, and only after
    the new checkpoint is completely written next to it.
    """
    dest = Path(path).expanduser().absolute()
    if dest.exists() and not dest.is_dir():
        raise CheckpointError(f"{dest} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not overwrite:
        raise CheckpointError(f"{dest} already exists and is not empty; "
                              "pass overwrite=True to replace it")
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} ids but the model's "
                              f"vocab_size is {model.cfg.vocab_size}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    _quiet_orbax()
    import orbax.checkpoint as ocp

    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.saving-", dir=dest.parent))
    try:
        flat = flat_params(model)
        packed = {k: v.fmt for k, v in flat.items() if packing.is_packed(v)}
        meta = {"format": FORMAT, "version": PACKED_VERSION if packed else VERSION,
                "model": model.cfg.to_dict()}
        if packed:
            meta[PACKED_KEY] = packed
        if extra:
            meta["extra"] = extra
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        tokenizers_io.save_tokenizer(tokenizer, tmp)
        params = {k: quant.to_gguf_blocks(v) if k in packed else np.asarray(v)
                  for k, v in flat.items()}
        with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()) as ckptr:
            ckptr.save(tmp / PARAMS_DIR, params)
        _write_manifest(tmp)
        move_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _this_process_only():
    """Orbax options for a save that this process makes alone: host arrays into a path
    only it knows. By default orbax waits at barriers for every JAX process, so a save by
    one process of a multi-process run (process 0 exporting the trained model) would wait
    forever for the others."""
    import orbax.checkpoint as ocp

    me = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})


# ---- loading ---------------------------------------------------------------------------

def check(path: str | os.PathLike, *, verify_hashes: bool = True) -> dict[str, Any]:
    """Validate a checkpoint directory; return its config.json contents.

    Raises CheckpointError naming every missing, truncated or altered file.
    """
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointError(f"no checkpoint at {root}: the path does not exist")
    if not root.is_dir():
        raise CheckpointError(f"{root} is not a checkpoint: a checkpoint is a directory")
    try:
        has_tokenizer = tokenizers_io.tokenizer_kind(root) is not None
    except ValueError as e:  # two tokenizers
        raise CheckpointError(str(e)) from None
    missing = [n for n in (CONFIG_FILE, None, PARAMS_DIR, MANIFEST_FILE)
               if (n is None and not has_tokenizer) or (n and not (root / n).exists())]
    missing = [tokenizers_io.DESCRIPTION if n is None else n for n in missing]
    if missing:
        raise CheckpointError(f"{root} is not a complete checkpoint: missing {', '.join(missing)}")
    try:
        manifest = json.loads((root / MANIFEST_FILE).read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{root / MANIFEST_FILE} is damaged (not the JSON it should be)")
    problems = []
    for rel, info in sorted(files.items()):
        f = root / rel
        if not f.is_file():
            problems.append(f"{rel} is missing")
        elif f.stat().st_size != info["bytes"]:
            problems.append(f"{rel} is truncated or altered "
                            f"({f.stat().st_size} bytes, expected {info['bytes']})")
        elif verify_hashes and _sha256(f) != info["sha256"]:
            problems.append(f"{rel} is corrupt (its SHA-256 differs from the manifest)")
    if problems:
        raise CheckpointError(f"damaged checkpoint {root}: " + "; ".join(problems))
    return read_versioned_json(root / CONFIG_FILE, FORMAT, READ_VERSIONS, CheckpointError,
                               what="checkpoint format")


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer stored in checkpoint `path`, or a CheckpointError saying why not."""
    try:
        return tokenizers_io.load_tokenizer(path)
    except Exception as e:
        raise CheckpointError(f"cannot read the tokenizer in {path}: {e}") from e


def load_config(path: str | os.PathLike) -> ModelConfig:
    meta = check(path, verify_hashes=False)
    try:
        return ModelConfig.from_dict(meta["model"])
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{Path(path) / CONFIG_FILE} holds an invalid model config: {e}")


def packed_formats(meta: dict[str, Any], cfg: ModelConfig, root: Path) -> dict[str, str]:
    """config.json's "packed": parameter name -> format, each checked (one-line errors)."""
    packed = meta.get(PACKED_KEY, {})
    where = root / CONFIG_FILE
    if meta.get("version") == VERSION and packed:
        raise CheckpointError(f"{where}: a version {VERSION} checkpoint cannot hold packed "
                              f"tensors (\"{PACKED_KEY}\" needs version {PACKED_VERSION})")
    if not isinstance(packed, dict):
        raise CheckpointError(f"{where}: \"{PACKED_KEY}\" must map parameter names to formats")
    shapes = param_shapes(cfg)
    for name, fmt in packed.items():
        if name not in shapes or not packing.packable(name):
            raise CheckpointError(f"{where}: \"{PACKED_KEY}\" names {name!r}, which is not "
                                  f"a weight matrix of this model")
        try:
            quant.get_format(fmt)
        except quant.QuantError as e:
            raise CheckpointError(f"{where}: packed tensor {name}: {e}") from None
        n_n, k_n = packing.matrix_shape(name, shapes[name])
        if k_n % quant.BLOCK:
            raise CheckpointError(f"{where}: packed tensor {name}: its input dimension {k_n} "
                                  f"is not a multiple of {quant.BLOCK}")
    return packed


def _stored_shapes(ckptr, params_dir: Path) -> dict[str, tuple[tuple[int, ...], Any]] | None:
    """(shape, dtype) of every array orbax stored, from its metadata (None if unreadable:
    the restore below then names the problem)."""
    try:
        tree = ckptr.metadata(params_dir).item_metadata.tree
        return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in tree.items()}
    except Exception:  # noqa: BLE001 - orbax metadata of an older layout
        return None


def load_params(path: str | os.PathLike, *, verify_hashes: bool = True
                ) -> tuple[ModelConfig, Transformer]:
    """Read config and parameters; arrays land on the default device, whatever saved them.

    Packed tensors come back packed, bit for bit as saved; one whose byte count does not
    match its shape and format, or whose block scale or minimum is NaN or infinite, is
    refused naming the tensor.
    """
    root = Path(path).expanduser().absolute()
    meta = check(root, verify_hashes=verify_hashes)
    cfg = load_config(root)
    packed = packed_formats(meta, cfg, root)
    _quiet_orbax()
    import orbax.checkpoint as ocp

    # The target pins every array to this process's default device, so a checkpoint
    # saved from GPU or from a sharded run restores on a CPU-only machine.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target, dense = {}, {}
    for name, shape in param_shapes(cfg).items():
        if name in packed:
            n_n, k_n = dense[name] = packing.matrix_shape(name, shape)
            shape = (n_n, k_n // quant.BLOCK * quant.FORMATS[packed[name]].block_bytes)
            target[name] = jax.ShapeDtypeStruct(shape, np.uint8, sharding=device)
        else:
            target[name] = jax.ShapeDtypeStruct(shape, jax.numpy.dtype(cfg.param_dtype),
                                                sharding=device)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            _check_stored(_stored_shapes(ckptr, root / PARAMS_DIR), target, packed, dense, root)
            flat = ckptr.restore(root / PARAMS_DIR, target)
    except CheckpointError:
        raise
    except Exception as e:  # orbax raises many types; the user needs one clear message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read parameters from {root / PARAMS_DIR}: {first}") from e
    for name, fmt in packed.items():
        try:
            flat[name] = quant.from_gguf_blocks(np.asarray(flat[name]), fmt, dense[name],
                                                name=name)
        except quant.QuantError as e:
            raise CheckpointError(f"{root}: {e}") from None
    return cfg, model_from_flat(cfg, flat)


def _check_stored(stored, target, packed, dense, root: Path) -> None:
    """Every stored array has the shape and dtype the config (and "packed") give it: orbax
    would otherwise pad or cut an array of the wrong size without a word."""
    if stored is None:
        return
    for name, spec in target.items():
        if name not in stored:
            raise CheckpointError(f"{root / PARAMS_DIR} has no parameter {name}")
        shape, dtype = stored[name]
        if name in packed:
            want = int(np.prod(spec.shape))
            got = int(np.prod(shape)) * dtype.itemsize
            if dtype != np.uint8 or shape != tuple(spec.shape):
                raise CheckpointError(
                    f"{root}: packed tensor {name} ({packed[name]}, matrix {dense[name]}) "
                    f"must be {want} bytes as uint8 {tuple(spec.shape)}, the checkpoint holds "
                    f"{got} bytes as {dtype} {shape}")
        elif shape != tuple(spec.shape):
            raise CheckpointError(f"{root}: parameter {name} is stored with shape {shape}, "
                                  f"the config needs {tuple(spec.shape)}")
