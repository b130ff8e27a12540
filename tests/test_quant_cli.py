"""`spark quantize`: a packed copy of a checkpoint, never half-written, refusing widening.

Called through `spark_model.cli.main` with the command added to the installed ones, so the
test runs this checkout's code whatever entry points the environment registered."""

import json

import numpy as np
import pytest

import spark_model
from spark_model import cli, commands, packing, quant
from spark_model.checkpoint import flat_params


@pytest.fixture(autouse=True)
def with_quantize(monkeypatch):
    installed = cli.commands
    monkeypatch.setattr(cli, "commands", lambda: {**installed(), "quantize": commands.quantize})


@pytest.fixture()
def f32_ckpt(tmp_path, small_model, small_tokenizer):
    return spark_model.SparkModel(small_model, small_tokenizer).save(tmp_path / "f32")


def test_quantize_writes_the_packed_checkpoint(f32_ckpt, small_model, capsys):
    out = f32_ckpt.parent / "q4"
    assert cli.main(["quantize", str(f32_ckpt), "--to", "q4_1", "--out", str(out)]) == 0
    assert f"to q4_1 in {out}" in capsys.readouterr().out
    loaded = spark_model.load(out, capacity=64)
    assert loaded.weights == "q4_1"
    want = flat_params(packing.convert_model(small_model, "q4_1"))
    for name, value in flat_params(loaded.model).items():
        if packing.is_packed(value):  # the reference quantizer's blocks
            np.testing.assert_array_equal(quant.to_gguf_blocks(value),
                                          quant.to_gguf_blocks(want[name]))
        else:
            np.testing.assert_array_equal(np.asarray(value), np.asarray(want[name]))
    meta = json.loads((out / "config.json").read_text())
    assert meta["extra"]["quantized"] == {"from": "f32", "to": "q4_1"}
    # Narrower again is fine; back to f32 dequantizes.
    assert cli.main(["quantize", str(out), "--to", "q4_0", "--out", str(out.parent / "q40")]) == 0
    assert spark_model.load(out.parent / "q40", capacity=64).weights == "q4_0"
    assert cli.main(["quantize", str(out), "--to", "f32", "--out", str(out.parent / "d")]) == 0
    assert spark_model.load(out.parent / "d", capacity=64).weights == "f32"


def test_quantize_refuses_widening_and_existing_output(f32_ckpt, capsys):
    q4 = f32_ckpt.parent / "q4"
    assert cli.main(["quantize", str(f32_ckpt), "--to", "q4_0", "--out", str(q4)]) == 0
    capsys.readouterr()
    wide = f32_ckpt.parent / "wide"
    assert cli.main(["quantize", str(q4), "--to", "q8_0", "--out", str(wide)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("spark quantize: error: ") and "\n" not in err
    assert "already quantized to q4_0; quantizing it to the wider q8_0" in err
    assert not wide.exists()
    assert cli.main(["quantize", str(f32_ckpt), "--to", "q8_0", "--out", str(q4)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert spark_model.load(q4, capacity=64).weights == "q4_0"  # untouched
    assert cli.main(["quantize", str(f32_ckpt), "--to", "q8_0", "--out", str(q4),
                     "--overwrite"]) == 0
    assert spark_model.load(q4, capacity=64).weights == "q8_0"


def test_interrupted_quantize_leaves_nothing_behind(f32_ckpt, small_tokenizer, monkeypatch):
    out = f32_ckpt.parent / "q8"
    assert cli.main(["quantize", str(f32_ckpt), "--to", "q4_1", "--out", str(out)]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(small_tokenizer), "save", broken)
    with pytest.raises(OSError, match="disk full"):
        cli.main(["quantize", str(f32_ckpt), "--to", "q8_0", "--out", str(out), "--overwrite"])
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # the old checkpoint stands, whole
    assert sorted(p.name for p in out.parent.iterdir()) == ["f32", "q8"]  # no temp dirs
