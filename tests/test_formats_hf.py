"""Hugging Face directories -> Spark: tiny random models written with the `safetensors`
package, read with read_hf, checked against the float64 NumPy reference; every bad input."""

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from reference import forward as reference_forward
from spark_model import ModelConfig, RopeScaling
from spark_model.checkpoint import model_from_flat
from spark_model.formats import hf
from spark_model.formats.hf import config_from_hf, is_hf_dir, read_hf
from spark_model.formats.hf_write import write_hf
from spark_model.formats.mapping import FormatError
from spark_model.formats.safetensors_file import SafetensorsReader
from spark_model.transformer import full_logits

V, D, L, N, K, H, F = 67, 24, 2, 4, 2, 8, 40  # head_dim 8 != D/N: config must carry it.


def llama_json(**over):
    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": V,
            "hidden_size": D, "intermediate_size": F, "num_hidden_layers": L,
            "num_attention_heads": N, "num_key_value_heads": K, "head_dim": H,
            "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 50_000.0,
            "rope_scaling": None, "tie_word_embeddings": False, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16"}
    base.update(over)
    return {k: v for k, v in base.items() if v is not ...}


def qwen2_json(**over):
    # Qwen2 configs carry no head_dim: it is hidden_size / heads (here 32 / 4).
    base = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": V,
            "hidden_size": 32, "intermediate_size": F, "num_hidden_layers": L,
            "num_attention_heads": N, "num_key_value_heads": K,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0,
            "rope_scaling": None, "tie_word_embeddings": True, "hidden_act": "silu",
            "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 21}
    base.update(over)
    return base


def spark_cfg(cfg_json):
    """The ModelConfig the test expects for a config.json written above (written out here,
    not derived by the code under test)."""
    d, n = cfg_json["hidden_size"], cfg_json["num_attention_heads"]
    sc = cfg_json.get("rope_scaling")
    return ModelConfig(
        vocab_size=V, d_model=d, n_layers=L, n_heads=n, n_kv_heads=K,
        head_dim=cfg_json.get("head_dim", d // n), d_ff=F, rope_theta=cfg_json["rope_theta"],
        rope_scaling=None if sc is None else RopeScaling(kind="linear", factor=sc["factor"]),
        max_seq_len=cfg_json["max_position_embeddings"], norm_eps=cfg_json["rms_norm_eps"],
        tie_embeddings=cfg_json["tie_word_embeddings"],
        attn_bias=cfg_json["architectures"] == ["Qwen2ForCausalLM"])


def random_params(cfg, seed=0):
    """Spark-named random parameters, large enough that attention is far from uniform."""
    rng = np.random.default_rng(seed)
    d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff

    def w(*shape):
        return rng.normal(0, 0.4, shape).astype(np.float32)

    p = {"embed": w(cfg.vocab_size, d), "final_norm.scale": 1 + w(d)}
    if not cfg.tie_embeddings:
        p["lm_head"] = w(d, cfg.vocab_size)
    for i in range(cfg.n_layers):
        b = f"blocks.{i}."
        p |= {b + "attn_norm.scale": 1 + w(d), b + "mlp_norm.scale": 1 + w(d),
              b + "attn.q": w(d, n, h), b + "attn.k": w(d, k, h), b + "attn.v": w(d, k, h),
              b + "attn.o": w(n, h, d), b + "mlp.gate": w(d, f), b + "mlp.up": w(d, f),
              b + "mlp.down": w(f, d)}
        if cfg.attn_bias:
            p |= {b + "attn.q_bias": w(n, h), b + "attn.k_bias": w(k, h),
                  b + "attn.v_bias": w(k, h)}
    return p


def hf_named(cfg, p):
    """Spark params -> torch Linear layout, written independently of the code under test:
    row (head, i) of q_proj is output feature head * H + i."""
    def heads_out(w_dnh):  # (D, N, H) -> (N*H, D)
        return np.transpose(w_dnh, (1, 2, 0)).reshape(-1, w_dnh.shape[0])

    t = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["final_norm.scale"]}
    if not cfg.tie_embeddings:
        t["lm_head.weight"] = np.transpose(p["lm_head"])
    for i in range(cfg.n_layers):
        b, m = f"blocks.{i}.", f"model.layers.{i}."
        t[m + "input_layernorm.weight"] = p[b + "attn_norm.scale"]
        t[m + "post_attention_layernorm.weight"] = p[b + "mlp_norm.scale"]
        for x in "qkv":
            t[m + f"self_attn.{x}_proj.weight"] = heads_out(p[b + f"attn.{x}"])
            if cfg.attn_bias:
                t[m + f"self_attn.{x}_proj.bias"] = p[b + f"attn.{x}_bias"].reshape(-1)
        o = p[b + "attn.o"]  # (N, H, D) -> (D, N*H)
        t[m + "self_attn.o_proj.weight"] = o.reshape(-1, o.shape[-1]).T
        for part in ("gate", "up", "down"):
            t[m + f"mlp.{part}_proj.weight"] = p[b + f"mlp.{part}"].T
    return {k: np.ascontiguousarray(v, np.float32) for k, v in t.items()}


def write_dir(root, cfg_json, tensors, shards=1):
    """A Hugging Face directory written with the `safetensors` package."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg_json))
    if shards == 1:
        save_file(tensors, str(root / "model.safetensors"), metadata={"format": "pt"})
        return root
    names = list(tensors)
    wmap = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(root / fname))
        wmap |= {n: fname for n in part}
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": wmap}))
    return root


def bf16_truncate(x):
    """float32 -> bfloat16 bits by dropping the low 16 bits (as the test's own writer)."""
    return (np.ascontiguousarray(x, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def write_bf16(path, tensors):
    """A hand-written bf16 safetensors file (NumPy has no bfloat16 for save_file)."""
    header, blobs, off = {}, [], 0
    for name, x in tensors.items():
        data = bf16_truncate(x).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(x.shape),
                        "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def assert_logits_match(imported, params, atol=1e-4):
    cfg = imported.cfg
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, 16)
    ours = np.asarray(full_logits(model_from_flat(cfg, imported.params), tokens[None]))[0]
    ref = reference_forward(params, cfg, tokens)
    assert np.abs(ref).max() > 1.0  # Not a degenerate model.
    np.testing.assert_allclose(ours, ref, rtol=atol, atol=atol)


# ---- good directories ---------------------------------------------------------------------

@pytest.mark.parametrize("tie", [True, False])
def test_llama_f32(tmp_path, tie):
    cfg_json = llama_json(tie_word_embeddings=tie,
                          rope_scaling={"type": "linear", "factor": 2.0})
    cfg = spark_cfg(cfg_json)
    params = random_params(cfg)
    root = write_dir(tmp_path / "m", cfg_json, hf_named(cfg, params))
    (root / "tokenizer.json").write_text("{}")
    assert is_hf_dir(root)
    imp = read_hf(root)
    assert imp.cfg == cfg
    assert imp.tokenizer_source == ("hf", root)
    assert imp.source == str(root)
    assert imp.info["architecture"] == "LlamaForCausalLM" and imp.info["shards"] == 1
    assert imp.info["dtype"] == "F32" and imp.info["tokenizer_files"] == ["tokenizer.json"]
    assert all(v.dtype == np.float32 for v in imp.params.values())
    for name, value in params.items():
        np.testing.assert_array_equal(imp.params[name], value, err_msg=name)
    assert_logits_match(imp, params)


def test_qwen2_with_biases(tmp_path):
    cfg_json = qwen2_json()
    cfg = spark_cfg(cfg_json)
    assert cfg.attn_bias and cfg.head_dim == 8
    params = random_params(cfg, seed=2)
    assert all(np.abs(params[f"blocks.{i}.attn.{x}_bias"]).min() > 0
               for i in range(L) for x in "qkv")
    imp = read_hf(write_dir(tmp_path / "m", cfg_json, hf_named(cfg, params)))
    assert imp.cfg == cfg and imp.info["architecture"] == "Qwen2ForCausalLM"
    assert_logits_match(imp, params)
    # The biases matter: dropping them changes the logits (so the test above saw them).
    zero = {k: (np.zeros_like(v) if k.endswith("_bias") else v) for k, v in params.items()}
    tokens = np.arange(8)
    assert not np.allclose(reference_forward(zero, cfg, tokens),
                           reference_forward(params, cfg, tokens), atol=1e-3)


def test_sharded_with_index_and_ignored_buffers(tmp_path):
    cfg_json = llama_json()
    cfg = spark_cfg(cfg_json)
    params = random_params(cfg, seed=3)
    tensors = hf_named(cfg, params)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(H // 2, np.float32)
    root = write_dir(tmp_path / "m", cfg_json, tensors, shards=2)
    imp = read_hf(root)
    assert imp.info["shards"] == 2 and imp.info["ignored"] == [
        "model.layers.0.self_attn.rotary_emb.inv_freq"]
    assert_logits_match(imp, params)


def test_bf16_and_f16(tmp_path):
    cfg_json = llama_json(tie_word_embeddings=True)
    cfg = spark_cfg(cfg_json)
    params = random_params(cfg, seed=4)
    tensors = hf_named(cfg, params)
    root = write_dir(tmp_path / "bf", cfg_json, {})
    (root / "model.safetensors").unlink()
    write_bf16(root / "model.safetensors", tensors)
    imp = read_hf(root)
    assert imp.info["dtype"] == "BF16"
    rounded = {k: (bf16_truncate(v).astype(np.uint32) << 16).view(np.float32)
               for k, v in params.items()}
    assert any(not np.array_equal(rounded[k], params[k]) for k in params)
    for name in params:
        np.testing.assert_array_equal(imp.params[name], rounded[name], err_msg=name)
    assert_logits_match(imp, rounded)

    half = {k: v.astype(np.float16) for k, v in tensors.items()}
    imp = read_hf(write_dir(tmp_path / "f16", cfg_json, half))
    assert imp.info["dtype"] == "F16"
    np.testing.assert_array_equal(imp.params["embed"], params["embed"].astype(np.float16))


def test_config_defaults_and_layouts():
    cfg = config_from_hf(llama_json(rope_theta=..., tie_word_embeddings=...,
                                    num_key_value_heads=None, head_dim=..., rms_norm_eps=...,
                                    hidden_size=32, max_position_embeddings=...))
    # transformers' LlamaConfig defaults: theta 10,000, untied, eps 1e-6, 2,048 positions.
    assert (cfg.rope_theta, cfg.tie_embeddings, cfg.norm_eps, cfg.max_seq_len) == (
        10_000.0, False, 1e-6, 2048)
    assert (cfg.n_kv_heads, cfg.head_dim) == (N, 32 // N)
    # Llama 3.1-style scaling, old ("rope_scaling") and new ("rope_parameters") layouts.
    l3 = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    want = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position=8192, kind="llama3")
    assert config_from_hf(llama_json(rope_scaling={"rope_type": "llama3", **l3})).rope_scaling \
        == want
    new = config_from_hf(llama_json(rope_theta=..., rope_scaling=..., rope_parameters={
        "rope_type": "llama3", "rope_theta": 500_000.0, **l3}))
    assert new.rope_scaling == want and new.rope_theta == 500_000.0
    assert config_from_hf(llama_json(rope_scaling={"type": "default"})).rope_scaling is None
    # Mistral: untied, no window (null) or one covering the whole context is full attention.
    mis = llama_json(architectures=["MistralForCausalLM"], model_type="mistral",
                     attention_bias=..., mlp_bias=..., sliding_window=None)
    assert config_from_hf(mis).n_kv_heads == K
    assert config_from_hf({**mis, "sliding_window": 512}).max_seq_len == 512
    del mis["num_key_value_heads"]  # MistralConfig's default is 8 kv heads.
    mis["num_attention_heads"] = 16
    assert config_from_hf(mis).n_kv_heads == 8
    # Qwen2: the window only covers layers from max_window_layers on.
    q = qwen2_json(use_sliding_window=True, sliding_window=64, max_window_layers=L)
    assert config_from_hf(q).attn_bias
    # model_type when architectures is absent.
    assert config_from_hf(qwen2_json(architectures=None)).attn_bias


def test_llama_attention_bias_zero_output_bias(tmp_path):
    cfg_json = llama_json(attention_bias=True)
    cfg = spark_cfg(cfg_json).replace(attn_bias=True)
    params = random_params(cfg, seed=5)
    tensors = hf_named(cfg, params)
    for i in range(L):
        tensors[f"model.layers.{i}.self_attn.o_proj.bias"] = np.zeros(D, np.float32)
    imp = read_hf(write_dir(tmp_path / "zero", cfg_json, tensors))
    assert imp.cfg == cfg
    assert_logits_match(imp, params)
    tensors["model.layers.1.self_attn.o_proj.bias"] = np.full(D, 0.1, np.float32)
    with pytest.raises(FormatError, match=r"o_proj\.bias is non-zero"):
        read_hf(write_dir(tmp_path / "nonzero", cfg_json, tensors))


def test_write_hf_round_trip(tmp_path):
    for i, (cfg_json, dtype) in enumerate([(llama_json(tie_word_embeddings=True), "float32"),
                                           (qwen2_json(rope_scaling={"rope_type": "linear",
                                                                     "factor": 4.0}), "float32"),
                                           (llama_json(), "bfloat16")]):
        cfg = spark_cfg(cfg_json)
        params = random_params(cfg, seed=6 + i)
        tok = tmp_path / f"tok{i}"
        tok.mkdir()
        (tok / "tokenizer.json").write_text('{"model": {}}')
        root = write_hf(tmp_path / f"out{i}", cfg, params, tokenizer=tok, dtype=dtype)
        imp = read_hf(root)
        assert imp.cfg == cfg
        assert (root / "tokenizer.json").read_text() == '{"model": {}}'
        for name, value in params.items():
            got = imp.params[name]
            if dtype == "float32":
                np.testing.assert_array_equal(got, value, err_msg=name)
            else:  # Round to nearest: low 16 bits clear, within half a bf16 step.
                assert not np.any(got.view(np.uint32) & 0xFFFF)
                step = np.abs(value) * 2.0 ** -7
                assert np.all(np.abs(got - value) <= step / 2 + 1e-30), name
        with pytest.raises(FileExistsError, match="config.json"):
            write_hf(root, cfg, params)
    assert (root / "config.json").stat().st_size > 0  # Untouched by the refused write.


# ---- against transformers itself (optional extra) -----------------------------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_transformers_directories(tmp_path, arch):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg_json = llama_json(tie_word_embeddings=True) if arch == "llama" else qwen2_json()
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**{k: v for k, v in cfg_json.items()
                                                  if k != "torch_dtype"})
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
            if p.ndim == 1 and p.shape[0] == config.hidden_size:
                p.add_(1.0)
    model.save_pretrained(tmp_path / "saved")
    imp = read_hf(tmp_path / "saved")
    tokens = np.random.default_rng(0).integers(0, V, (1, 16))
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens)).logits.numpy()
    ours = np.asarray(full_logits(model_from_flat(imp.cfg, imp.params), tokens))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    # And the other way: what write_hf writes, transformers loads as the same model.
    back = transformers.AutoModelForCausalLM.from_pretrained(
        write_hf(tmp_path / "ours", imp.cfg, imp.params)).eval()
    with torch.no_grad():
        again = back(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(again, theirs, rtol=1e-5, atol=1e-5)


# ---- bad input ------------------------------------------------------------------------------

@pytest.fixture
def good(tmp_path):
    """A valid tiny Llama directory and its pieces, to break one way per test."""
    cfg_json = llama_json()
    cfg = spark_cfg(cfg_json)
    tensors = hf_named(cfg, random_params(cfg))
    return tmp_path / "m", cfg_json, tensors


@pytest.fixture
def no_reads(monkeypatch):
    """Fail the test if any tensor data is decoded: bad input must be caught before."""
    def refuse(self, name):
        raise AssertionError(f"tensor {name} was read before the input was validated")
    monkeypatch.setattr(SafetensorsReader, "read", refuse)


def raises(root, match):
    with pytest.raises(FormatError, match=match) as e:
        read_hf(root)
    assert "\n" not in str(e.value)
    return str(e.value)


def patch_header(path, edit):
    """Rewrite a safetensors file's header through `edit(header) -> header`."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = edit(json.loads(blob[8:8 + n]))
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + blob[8 + n:])


def test_bad_directory_and_config(good, no_reads):
    root, cfg_json, tensors = good
    write_dir(root, cfg_json, tensors)
    (root / "config.json").unlink()
    raises(root, r"no config\.json")
    (root / "config.json").write_text("{ not json")
    assert is_hf_dir(root)
    raises(root, r"config\.json: not valid JSON")
    (root / "config.json").write_text(json.dumps(llama_json(hidden_size=...)))
    raises(root, r"required field 'hidden_size' is missing")
    (root / "config.json").write_text(json.dumps(llama_json(num_hidden_layers=2.0)))
    raises(root, r"'num_hidden_layers' must be int")
    (root / "config.json").write_text(json.dumps(llama_json(architectures=["GPT2LMHeadModel"])))
    raises(root, r"architecture GPT2LMHeadModel is not supported")
    (root / "config.json").write_text(json.dumps(llama_json(architectures=None,
                                                            model_type="gemma")))
    raises(root, r"model_type 'gemma' is not supported")
    for kind in ("dynamic", "yarn", "longrope"):
        (root / "config.json").write_text(json.dumps(llama_json(
            rope_scaling={"rope_type": kind, "factor": 4.0})))
        raises(root, rf"rope scaling type '{kind}' is not supported")
    (root / "config.json").write_text(json.dumps(llama_json(
        rope_scaling={"rope_type": "llama3", "factor": 8.0})))
    raises(root, r"rope_scaling: required field 'low_freq_factor' is missing")
    (root / "config.json").write_text(json.dumps(llama_json(hidden_act="gelu")))
    raises(root, r"hidden_act 'gelu' is not supported")
    (root / "config.json").write_text(json.dumps(llama_json(mlp_bias=True)))
    raises(root, r"mlp_bias")
    (root / "config.json").write_text(json.dumps(llama_json(
        quantization_config={"quant_method": "gptq"})))
    raises(root, r"quantized checkpoints \(gptq\)")
    mistral = llama_json(architectures=["MistralForCausalLM"], model_type="mistral",
                         max_position_embeddings=32768, sliding_window=4096)
    (root / "config.json").write_text(json.dumps(mistral))
    raises(root, r"sliding_window 4096 is shorter than max_position_embeddings 32768")
    del mistral["sliding_window"]  # MistralConfig's default window is 4096 as well.
    (root / "config.json").write_text(json.dumps(mistral))
    raises(root, r"sliding_window 4096")


def test_qwen2_window_layers_named(good):
    q = qwen2_json(use_sliding_window=True, sliding_window=64, max_window_layers=1)
    with pytest.raises(FormatError, match=r"sliding_window 64 .*\(layers 1\.\.1\)"):
        config_from_hf(q)


def test_bad_weights_files(good, no_reads):
    root, cfg_json, tensors = good
    root.mkdir()
    (root / "config.json").write_text(json.dumps(cfg_json))
    (root / "pytorch_model.bin").write_bytes(b"x")
    raises(root, r"no weights: neither model\.safetensors nor .*pytorch_model\.bin")
    write_dir(root, cfg_json, tensors, shards=2)
    (root / "model-00002-of-00002.safetensors").unlink()
    raises(root, r"shard model-00002-of-00002\.safetensors is missing")
    index = json.loads((root / "model.safetensors.index.json").read_text())
    first, second = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == first)
    save_file({n: tensors[n] for n, f in index["weight_map"].items() if f == second}
              | {name: tensors[name]}, str(root / second))  # Also in the second shard.
    raises(root, rf"tensor {name} is in both {first} and {second}")
    write_dir(root, cfg_json, tensors, shards=2)
    index["weight_map"][name] = second
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    raises(root, rf"index\.json: tensor {name} is not in shard {second}")
    (root / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    raises(root, r"needs a non-empty 'weight_map'")
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "../x.safetensors"}}))
    raises(root, r"shard '\.\./x\.safetensors' is not a file name")


def test_truncated_and_damaged_safetensors(good, no_reads):
    root, cfg_json, tensors = good
    write_dir(root, cfg_json, tensors)
    path = root / "model.safetensors"
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    path.write_bytes(blob[:5])
    raises(root, r"truncated safetensors file \(5 bytes\)")
    path.write_bytes(blob[:8 + n // 2])  # Cut inside the header.
    raises(root, rf"header length {n} runs past the end of the file")
    path.write_bytes(struct.pack("<Q", 1 << 40) + blob[8:])
    raises(root, r"header length 1099511627776 runs past the end")
    path.write_bytes(blob[:-10])  # Cut inside the data.
    raises(root, r"past the end of the data")
    path.write_bytes(struct.pack("<Q", n) + b"{" * n + blob[8 + n:])
    raises(root, r"header is not valid JSON")
    path.write_bytes(blob)

    def push_past_end(h):
        h["model.norm.weight"]["data_offsets"] = [10**9, 10**9 + 4 * D]
        return h
    patch_header(path, push_past_end)
    raises(root, r"tensor model\.norm\.weight: data_offsets end \d+ is past the end of the data")
    path.write_bytes(blob)

    def inconsistent(h):
        h["model.norm.weight"]["shape"] = [D + 1]
        return h
    patch_header(path, inconsistent)
    raises(root, r"model\.norm\.weight: data_offsets hold 96 bytes but F32 \(25,\) needs 100")
    path.write_bytes(blob)

    def overlap(h):
        start = h["model.embed_tokens.weight"]["data_offsets"][0]
        h["model.norm.weight"]["data_offsets"] = [start, start + 4 * D]
        return h
    patch_header(path, overlap)
    raises(root, r"overlap")
    path.write_bytes(blob)

    def unknown_dtype(h):
        h["model.norm.weight"]["dtype"] = "Q4"
        return h
    patch_header(path, unknown_dtype)
    raises(root, r"tensor model\.norm\.weight: unknown dtype 'Q4'")


def test_unsupported_dtype_named(good, no_reads):
    root, cfg_json, tensors = good
    tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.float64)
    write_dir(root, cfg_json, tensors)
    raises(root, r"tensor model\.norm\.weight is stored as F64; readable dtypes are F32, F16, "
                 r"BF16")


def test_missing_and_misshapen_tensors(good, no_reads):
    root, cfg_json, tensors = good
    missing = dict(tensors)
    del missing["model.layers.1.mlp.up_proj.weight"]
    write_dir(root, cfg_json, missing)
    raises(root, r"tensor model\.layers\.1\.mlp\.up_proj\.weight is missing")
    wrong = dict(tensors)
    wrong["model.layers.0.self_attn.k_proj.weight"] = np.zeros((K * H + 1, D), np.float32)
    write_dir(root, cfg_json, wrong)
    raises(root, r"tensor model\.layers\.0\.self_attn\.k_proj\.weight has shape \(17, 24\), "
                 r"the config needs \(16, 24\)")
    extra = dict(tensors, **{"model.layers.0.mlp.gate_proj.bias": np.zeros(F, np.float32)})
    write_dir(root, cfg_json, extra)
    raises(root, r"unexpected tensor model\.layers\.0\.mlp\.gate_proj\.bias")


def test_memory_checked_before_reading(good, no_reads, monkeypatch):
    root, cfg_json, tensors = good
    write_dir(root, cfg_json, tensors)
    monkeypatch.setattr(hf, "available_memory", lambda: 10_000)
    msg = raises(root, r"float32 parameters need [\d.]+ KiB but only 9\.77 KiB of memory is "
                       r"available")
    need = 4 * sum(v.size for v in tensors.values()) + 4 * V * D
    assert f"{need / 1024:.2f} KiB" in msg
    assert hf.available_memory() == 10_000
    monkeypatch.undo()
    real = hf.available_memory()
    assert real is None or real > 0


def test_is_hf_dir(tmp_path, good):
    root, cfg_json, tensors = good
    assert not is_hf_dir(tmp_path / "nothing")
    write_dir(root, cfg_json, tensors)
    assert is_hf_dir(root) and not is_hf_dir(root / "model.safetensors")
    spark = tmp_path / "spark"
    spark.mkdir()
    (spark / "config.json").write_text(json.dumps({"format": "spark-checkpoint"}))
    assert not is_hf_dir(spark)
