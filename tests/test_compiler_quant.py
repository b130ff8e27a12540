"""The compiler with packed weights (q8_0, q4_0, q4_1): tiles hold whole 32-weight blocks
with their scales, bytes are counted as the format stores them, and the placed program
computes the quantized model's logits (against an independent float64 forward)."""

import json

import numpy as np
import pytest

import compiler
from compiler import cost
from compiler.check import check_plan
from compiler.ir import PACKED_BLOCK, PACKED_BLOCK_BYTES
from compiler.partition import tile_weight
from compiler.place import share_candidates
from compiler.verify import stored_weights
from spark_model import ModelConfig, init_model, quant
from spark_model.checkpoint import flat_params, model_from_flat
import reference

GRID = "grid:12x10:8KB"  # small cores: matrices are split over rows and columns
PROMPT = [5, 17, 42, 7, 299, 0, 3, 128]
# Every matrix's blocked axis a multiple of 32, some of them uneven over the rows
# (d_model = 3 blocks, d_ff = 5): an untied head, so the embedding is a table of its own
# (blocked along D), and a tied one (the table is the output projection, blocked along K).
UNTIED = ModelConfig(vocab_size=320, d_model=96, n_layers=2, n_heads=6, n_kv_heads=2,
                     head_dim=16, d_ff=160, rope_theta=10_000.0, rope_scaling=None,
                     tie_embeddings=False)
TIED = UNTIED.replace(tie_embeddings=True)
PACKED = list(PACKED_BLOCK_BYTES)


def test_block_sizes_agree_with_the_packed_format_module():
    assert PACKED_BLOCK == quant.BLOCK
    assert PACKED_BLOCK_BYTES == {n: f.block_bytes for n, f in quant.FORMATS.items()}


def _weight_bytes_of_tiles(tl) -> int:
    """Bytes every tile of a tiling holds for its weight (buffers left out)."""
    lk, ln = np.diff(tl.k_bounds())[:, None], np.diff(tl.n_bounds())[None, :]
    return int(tl.weight_bytes(lk, ln).sum())


@pytest.mark.parametrize("fmt", PACKED)
@pytest.mark.parametrize("share", share_candidates(TIED.n_layers) + [0])
def test_tiles_split_only_between_blocks_and_count_the_format_bytes(fmt, share):
    for cfg in (UNTIED, TIED):
        plan = compiler.compile(cfg, GRID, context=64, layers_per_region=share, weights=fmt)
        check_plan(plan)
        assert plan.weights == fmt and plan.share == share
        per_weight = quant.FORMATS[fmt].bytes_per_weight
        g = plan.graph
        for name, info in g.params.items():
            op = g.op(g.owner()[name])
            if not op.is_tiled:
                continue
            tl = plan.regions[op.name].tiling
            k_cuts, n_cuts = tl.k_bounds(), tl.n_bounds()
            # The blocks run along K of a matvec, along the row (D) of a lookup's table.
            cuts = n_cuts if op.kind == "lookup" else k_cuts
            assert (cuts % 32 == 0).all(), (name, cuts)
            if op.kind == "matvec" and op.k // 32 > 1:
                assert tl.pr > 1 or share == 0 and plan.target.rows == 1  # really split
            # Bytes: N*K*bytes per weight, and what quantize really packs.
            expected = op.k * op.n * per_weight
            assert _weight_bytes_of_tiles(tl) == expected == op.weight_bytes, name
            rows = op.k if op.kind == "lookup" else op.n
            packed = quant.quantize(np.ones((rows, op.k * op.n // rows), np.float32), fmt)
            assert packed.nbytes == expected
            # Every element on exactly one tile (elements numbered 1..size).
            ids = np.arange(1, info.size + 1, dtype=np.int64).reshape(info.shape)
            w_kn = ids.reshape(op.n, op.k).T if op.transposed else ids.reshape(op.k, op.n)
            tiles = tile_weight(w_kn, tl)
            held = np.sort(tiles[tiles > 0])
            assert (held == ids.ravel()).all(), name
        norms = sum(p.nbytes for n, p in g.params.items() if not g.op(g.owner()[n]).is_tiled)
        matrices = sum(o.k * o.n for o in g.ops if o.is_tiled) * per_weight
        assert compiler.format_summary(plan) and g.weight_bytes() == matrices + norms


def test_a_tiling_that_ignores_the_blocks_is_refused():
    import dataclasses

    plan = compiler.compile(TIED, GRID, context=64, layers_per_region=1, weights="q4_0")
    name = "blocks.0.mlp.down"
    regions = dict(plan.regions)
    regions[name] = dataclasses.replace(
        regions[name], tiling=dataclasses.replace(regions[name].tiling, kblock=1))
    with pytest.raises(compiler.CompilerError,
                       match=r"region blocks\.0\.mlp\.down stores weight .* q4_0 has 32"):
        check_plan(dataclasses.replace(plan, regions=regions))


def test_packed_formats_shrink_sram_and_lengthen_the_context():
    """Smaller weights leave more of every core for the cache, on the same grid."""
    cfg = ModelConfig.preset("tiny")
    got = {w: compiler.compile(cfg, "grid:64x64:48KB", context=2048, weights=w)
           for w in ("f32", "q8_0", "q4_0")}
    wb = {w: p.graph.weight_bytes() for w, p in got.items()}
    assert wb["f32"] > wb["q8_0"] > wb["q4_0"]
    assert got["q4_0"].max_context >= got["q8_0"].max_context >= got["f32"].max_context


def test_dequantizing_costs_compute_per_weight():
    plan = compiler.compile(TIED, GRID, context=64, layers_per_region=1, weights="q4_1")
    tl = plan.regions["blocks.0.mlp.up"].tiling
    t = plan.target
    dense = cost.matvec(tl, 4, t).compute
    packed = cost.matvec(tl, 4, t, dequant=cost.DEQUANT_OPS_PER_WEIGHT["q4_1"]).compute
    assert dense == tl.tk * tl.tn / t.macs_per_cycle
    assert packed == pytest.approx(3 * dense)  # the MAC and two expanding operations
    # A prefill expands each tile once, whatever the number of tokens.
    assert cost.matvec(tl, 4, t, tokens=10, dequant=2.0).compute == pytest.approx(12 * dense)


def test_bad_formats_and_unblockable_shapes_are_refused():
    with pytest.raises(compiler.CompilerError, match=r"unknown weight format 'q5_k'"):
        compiler.compile(TIED, GRID, context=64, weights="q5_k")
    with pytest.raises(compiler.CompilerError,
                       match=r"weight blocks\.0\.mlp\.down cannot be stored as q8_0: its "
                             r"input axis K has 150 weights"):
        compiler.compile(TIED.replace(d_ff=150), GRID, context=64, weights="q8_0")


def _random(cfg, seed=3):
    flat = {k: np.asarray(v) for k, v in flat_params(init_model(cfg, seed=seed)).items()}
    rng = np.random.default_rng(seed)
    for name, a in flat.items():
        if name.endswith(".scale"):
            flat[name] = rng.uniform(0.5, 1.5, a.shape).astype(a.dtype)
    return model_from_flat(cfg, flat), flat


def _placed_logits(plan, flat, ids):
    import jax.numpy as jnp

    from compiler.execute import Runner, leaves
    from spark_model.kv_cache import init_cache

    run, weights = Runner(plan), leaves(plan, flat)
    cache = init_cache(plan.cfg, 1, 64)
    out = []
    for pos, tok in enumerate(ids):
        logits, cache = run(weights, jnp.array([[tok]]), jnp.array([[pos]]), cache)
        out.append(np.asarray(logits[0, -1], np.float64))
    return np.stack(out)


def test_placed_q4_0_program_computes_the_quantized_models_logits():
    """The untied head (its own table blocked along D); the CLI test below runs the tied
    one through `--verify`."""
    cfg = UNTIED
    _, flat = _random(cfg)
    plan = compiler.compile(cfg, GRID, context=64, weights="q4_0")
    stored = stored_weights(plan, flat)
    # q4_0 stores each block of 32 along the input axis as d * (q - 8), q in 0..15: at
    # most 16 values per block; the same 32 weights across the output axis are not.
    q = stored["blocks.0.attn.q"]  # (D, N, H): blocks run along D
    assert max(len(np.unique(q[b:b + 32, n, h])) for b in range(0, 96, 32)
               for n in range(6) for h in range(16)) <= 16
    assert len(np.unique(q[0, 0, :])) > 8  # 16 weights of one input, distinct
    emb = stored["embed"]  # (V, D) table: blocked along D
    assert max(len(np.unique(emb[v, b:b + 32])) for v in range(40) for b in (0, 32, 64)) <= 16
    # The placed program against the independent float64 forward of those weights.
    ours = _placed_logits(plan, stored, PROMPT)
    assert np.abs(ours - reference.forward(stored, cfg, np.array(PROMPT))).max() < 1e-4
    # The quantization matters: the f32 model's logits are farther off than the tolerance.
    assert np.abs(ours - reference.forward(flat, cfg, np.array(PROMPT))).max() > 1e-3


def test_cli_compiles_verifies_and_saves_a_packed_plan(tmp_path, small_tokenizer, capsys):
    import spark_model
    from spark_model import cli

    cfg = TIED.replace(vocab_size=small_tokenizer.vocab_size, max_seq_len=256)
    model, _ = _random(cfg)
    ckpt = spark_model.SparkModel(model, small_tokenizer).save(tmp_path / "ckpt")
    rc = cli.main(["compile", "--checkpoint", str(ckpt), "--target", GRID, "--context", "64",
                   "--weights", "q8_0", "--verify", "--json", "--report", str(tmp_path / "r")])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    assert s["weights"] == "q8_0" and s["max_abs_logit_diff"] < 1e-4
    assert s["weight_bytes"] == compiler.load_json(tmp_path / "r" / "plan.json").graph.weight_bytes()
    loaded = compiler.load_json(tmp_path / "r" / "plan.json")
    assert loaded.weights == "q8_0"
    assert loaded.regions["blocks.0.mlp.down"].tiling.kblock == 32
    check_plan(loaded)
    with pytest.raises(SystemExit) as e:  # argparse refuses an unknown format
        cli.main(["compile", "--preset", "tiny", "--weights", "q3_k"])
    assert e.value.code == 2 and "q3_k" in capsys.readouterr().err
