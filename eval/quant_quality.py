"""What packing the weights costs in fit: held-out bits per byte at each weight format.

For each model, the same held-out files (the standard library's validation split, the files
`spark eval --tasks bpb` reads) are scored with the model's weight matrices in f32, q8_0,
q4_1 and q4_0 (spark_model/packing.py; norms stay f32), and "stored" (as the source holds
them: a GGUF file's own mix of formats), in one table:

    python -m eval.quant_quality [--models checkpoints/spark-tiny smollm2-135m]
                                 [--formats f32,q8_0,q4_1,q4_0,stored] [--files 48]
                                 [--seq-len T] [--json out.json]

A model whose source is already packed (SmolLM2's Q4_1 GGUF file) has no float original
here: its "f32" row is the file's weights dequantized, a wider format is quantized from
those (so it cannot be better than the file), and the table says so. The full forward
scores the windows (`SparkModel.nll`), which multiplies by the dequantized weights
exactly: the figures are the formats' own cost, not the decode kernel's activation
rounding.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from eval.bpb import bits_per_byte

FORMATS = ("f32", "q8_0", "q4_1", "q4_0")
DEFAULT_MODELS = ("checkpoints/spark-tiny", "smollm2-135m")


def _load(model: str, fmt: str):
    """The model at `fmt` ("stored": as its source holds it); widening a packed source goes
    through its dequantized weights."""
    import spark_model
    from spark_model import packing

    try:
        return spark_model.load(model, weights=None if fmt == "stored" else fmt), None
    except Exception as e:  # noqa: BLE001 - a refused widening, named below
        if "wider" not in str(e):
            raise
    base = spark_model.load(model, weights="f32")
    m = spark_model.SparkModel(packing.convert_model(base.model, fmt), base.tokenizer,
                               base.path)
    m.train_seq_len = base.train_seq_len
    return m, "from the dequantized packed source"


def run(models=DEFAULT_MODELS, formats=FORMATS, n_files: int | None = 48,
        seq_len: int | None = None, log=print) -> list[dict]:
    from eval.sources import default_code

    files, _ = default_code(["stdlib-heldout"])["stdlib-heldout"]
    files = files[:n_files] if n_files else files
    rows = []
    for model in models:
        for fmt in formats:
            t0 = time.perf_counter()
            m, note = _load(model, fmt)
            res = bits_per_byte(m, files, seq_len=seq_len)
            row = {"model": model, "weights": fmt, "held": m.weights,
                   "param_mib": m.param_bytes / 2**20,
                   "bits_per_byte": res["bits_per_byte"], "files": res["files"],
                   "bytes": res["bytes"], "seq_len": res["seq_len"],
                   "seconds": time.perf_counter() - t0, "source": m.source_info.get(
                       "file_type") or m.source_info.get("kind")}
            if note:
                row["note"] = note
            rows.append(row)
            log(f"{model} {fmt:5s} ({m.weights}, {row['param_mib']:.1f} MiB): "
                f"{row['bits_per_byte']:.4f} bits/byte over {res['files']} files "
                f"({res['bytes']:,} bytes, windows of {res['seq_len']}){' ' + note if note else ''}")
            del m
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one line per model, one column per format (difference from f32 in
    parentheses)."""
    formats = list(dict.fromkeys(r["weights"] for r in rows))
    out = ["| model | " + " | ".join(formats) + " |", "|---" * (len(formats) + 1) + "|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["weights"]: r for r in rows if r["model"] == model}
        base = by.get("f32", {}).get("bits_per_byte")
        cells = []
        for f in formats:
            r = by.get(f)
            if r is None:
                cells.append("")
                continue
            cell = f"{r['bits_per_byte']:.4f}"
            if base is not None and f != "f32":
                cell += f" ({r['bits_per_byte'] - base:+.4f})"
            cells.append(cell + (" *" if "note" in r else ""))
        out.append(f"| {model} | " + " | ".join(cells) + " |")
    if any("note" in r for r in rows):
        out.append("\n\\* quantized from the dequantized weights of an already packed source")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--files", type=int, default=48, help="held-out files scored (0: all)")
    ap.add_argument("--seq-len", type=int, default=None, help="scoring window (default: the "
                    "model's training length, else 2,048)")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    rows = run(args.models, [f.strip() for f in args.formats.split(",") if f.strip()],
               args.files or None, args.seq_len)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
