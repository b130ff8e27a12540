"""Shared fixtures: a small code tokenizer and a small model built on it."""

import pytest

from spark_model import ModelConfig, RopeScaling, init_model
from spark_model.tokenizer import stdlib_python_files, train_tokenizer


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory):
    """A 512-piece tokenizer trained on a slice of the standard library (a few seconds)."""
    files = stdlib_python_files()[::20]
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return train_tokenizer(texts, 512, path)


@pytest.fixture(scope="session")
def small_model(small_tokenizer):
    cfg = ModelConfig(vocab_size=small_tokenizer.vocab_size, d_model=32, n_layers=2,
                      n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                      rope_theta=500_000.0, rope_scaling=RopeScaling())
    return init_model(cfg, seed=0)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Each test module's compiled programs and arrays are released after it: the whole
    suite runs in one process, and their memory otherwise accumulates."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
