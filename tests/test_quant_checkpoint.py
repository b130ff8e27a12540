"""Packed tensors in the checkpoint format: bit-exact round trips, and every bad input
refused with a one-line error that names the problem."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import spark_model
from spark_model import CheckpointError, checkpoint, kernels, packing, quant
from spark_model.checkpoint import flat_params, model_from_flat


def _mixed(model):
    """The model with its matrices in every packed format: q4_1 blocks, a q8_0 embedding,
    q4_0 MLP down projections, and the norms in float32."""
    flat = flat_params(model)
    out = {}
    for name, value in flat.items():
        fmt = ("q8_0" if name == "embed" else "q4_0" if name.endswith("mlp.down")
               else "q4_1" if packing.packable(name) else None)
        out[name] = packing.pack(name, value, fmt) if fmt else np.asarray(value)
    return model_from_flat(model.cfg, out)


@pytest.fixture()
def packed_ckpt(tmp_path, small_model, small_tokenizer):
    model = _mixed(small_model)
    return model, spark_model.SparkModel(model, small_tokenizer).save(tmp_path / "packed")


def _restore(root):
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return {k: np.asarray(v) for k, v in ckptr.restore(root / "params").items()}


def _rewrite_params(root, params):
    """Replace the stored arrays (and the manifest, so that only the content is wrong)."""
    import shutil

    import orbax.checkpoint as ocp

    shutil.rmtree(root / "params")
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(root / "params", params)
    checkpoint._write_manifest(root)


def _rewrite_config(root, edit):
    meta = json.loads((root / "config.json").read_text())
    edit(meta)
    (root / "config.json").write_text(json.dumps(meta))
    checkpoint._write_manifest(root)


def test_packed_round_trip_is_bit_exact(packed_ckpt, small_tokenizer):
    model, root = packed_ckpt
    meta = json.loads((root / "config.json").read_text())
    assert meta["version"] == checkpoint.PACKED_VERSION
    want = flat_params(model)
    assert meta["packed"] == {n: v.fmt for n, v in want.items() if packing.is_packed(v)}
    stored = _restore(root)
    for name, value in want.items():  # stored as the GGUF block bytes
        if packing.is_packed(value):
            assert stored[name].dtype == np.uint8
            np.testing.assert_array_equal(stored[name], quant.to_gguf_blocks(value))
    manifest = json.loads((root / "manifest.json").read_text())["files"]
    assert sum(info["bytes"] for rel, info in manifest.items() if rel.startswith("params/")) \
        < packing.param_bytes({n: np.asarray(v) for n, v in
                               flat_params(packing.convert_model(model, "f32")).items()}) / 2
    loaded = spark_model.load(root, capacity=64)
    got = flat_params(loaded.model)
    for name, value in want.items():
        assert packing.format_of(got[name]) == packing.format_of(value), name
        # A loaded model holds N % 16 == 0 matrices interleaved: the same bytes regrouped.
        assert not packing.is_packed(got[name]) or got[name].interleaved == (
            kernels.usable(jnp.zeros(1)) and got[name].shape[0] % 16 == 0)
        rows = [quant.deinterleave(v) if packing.is_packed(v) else v for v in (got[name], value)]
        for a, b in zip(*(([v.qs, v.d, v.m] if packing.is_packed(v) else [v]) for v in rows)):
            if a is None:
                assert b is None
                continue
            a, b = np.asarray(a), np.asarray(b)
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8), err_msg=name)
    ids = np.asarray([small_tokenizer.encode("def f(x):\n    return x\n", bos=True)])
    np.testing.assert_array_equal(np.asarray(loaded.logits(ids)),
                                  np.asarray(spark_model.SparkModel(model, small_tokenizer)
                                             .logits(ids)))
    again = loaded.save(root.parent / "again")  # and once more: the same bytes
    assert _restore(again).keys() == stored.keys()
    for name in stored:
        np.testing.assert_array_equal(_restore(again)[name], stored[name])


def test_float_checkpoint_stays_version_1(tmp_path, small_model, small_tokenizer):
    root = spark_model.SparkModel(small_model, small_tokenizer).save(tmp_path / "f32")
    meta = json.loads((root / "config.json").read_text())
    assert meta["version"] == 1 and "packed" not in meta


def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def test_wrong_byte_count_is_refused_naming_the_tensor(packed_ckpt):
    _, root = packed_ckpt
    params = _restore(root)
    params["blocks.1.attn.k"] = params["blocks.1.attn.k"][:, :-1]  # one byte short per row
    _rewrite_params(root, params)
    with pytest.raises(CheckpointError) as e:
        spark_model.load(root)
    n_n, k_n = 16, 32  # (K heads * H, D) of the small model
    want = n_n * k_n // 32 * 20
    assert (f"packed tensor blocks.1.attn.k (q4_1, matrix ({n_n}, {k_n})) must be {want} "
            f"bytes") in _one_line(e)
    assert f"holds {want - n_n} bytes" in str(e.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_block_scale_is_refused_naming_the_tensor(packed_ckpt, bad):
    _, root = packed_ckpt
    params = _restore(root)
    raw = params["blocks.0.mlp.down"].copy()  # q4_0: 18 bytes per block, d first
    raw[3, 18:20] = np.array([bad], np.float16).view(np.uint8)  # row 3, block 1
    params["blocks.0.mlp.down"] = raw
    _rewrite_params(root, params)
    with pytest.raises(CheckpointError) as e:
        spark_model.load(root)
    assert (f"tensor 'blocks.0.mlp.down': q4_0 block scale at row 3, block 1 is "
            f"{float(np.float16(bad))}") in _one_line(e)


def test_unknown_format_name_is_refused(packed_ckpt):
    _, root = packed_ckpt
    _rewrite_config(root, lambda m: m["packed"].update({"blocks.0.attn.q": "q5_9"}))
    with pytest.raises(CheckpointError) as e:
        spark_model.load(root)
    assert "packed tensor blocks.0.attn.q: unknown quantization format 'q5_9'" in _one_line(e)


def test_packed_names_must_be_weight_matrices(packed_ckpt):
    _, root = packed_ckpt
    _rewrite_config(root, lambda m: m["packed"].update({"final_norm.scale": "q8_0"}))
    with pytest.raises(CheckpointError, match="names 'final_norm.scale', which is not a "
                                              "weight matrix") as e:
        spark_model.load(root)
    _one_line(e)
    _rewrite_config(root, lambda m: m.update(version=1))
    with pytest.raises(CheckpointError, match="a version 1 checkpoint cannot hold packed"):
        spark_model.load(root)


def test_widening_a_packed_checkpoint_is_refused(packed_ckpt):
    _, root = packed_ckpt
    with pytest.raises(CheckpointError) as e:
        spark_model.load(root, weights="q8_0")  # its matrices are q4_1 and q4_0
    assert "is already quantized to q4_1; quantizing it to the wider q8_0" in _one_line(e)
    with pytest.raises(CheckpointError, match="already quantized to q4_0; quantizing it to "
                                              "the wider q4_1"):
        spark_model.load(root, weights="q4_1")  # the q4_0 down projections
    narrower = spark_model.load(root, weights="q4_0", capacity=64)  # allowed: narrower
    assert narrower.weights == "q4_0"
