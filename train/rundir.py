"""The run directory: its layout, the checks before a run starts or resumes, run.json, and
the exported model.

Run directory (``out``)::

    <out>/config.json, tokenizer.model,    the latest exported model: a spark checkpoint,
          params/, manifest.json            so spark_model.load(out) works (see export)
    <out>/metrics.jsonl                     one JSON object per log / eval interval
    <out>/loss.png                          loss and bits-per-byte curves (end of run)
    <out>/training/run.json                 the run's settings: marks a training directory
    <out>/training/corpus.json              the corpus manifest: every document's name, byte
                                            size and SHA-256, checked on resume (train/manifest.py)
    <out>/training/tokenizer.model          the tokenizer this run trains with (SentencePiece;
    <out>/training/tokenizer/               another kind, e.g. an --init model's BPE, is a
                                            directory of its own files)
    <out>/training/checkpoints/<step>/      orbax CheckpointManager: params, optimizer
                                            state (item "state") and step + data position
                                            (item "data"); the last `keep` are kept

The exported model is rewritten at every checkpoint save and at the end; it is never
mixed up with the orbax state, and a directory that is not a training run is never written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np

from spark_model import checkpoint
from spark_model.config import ModelConfig
from train.config import RUN_FIELDS, TrainConfig, TrainError

RUN_DIR = "training"
RUN_FILE = "run.json"
STATE_DIR = "checkpoints"
RUN_TOKENIZER = "tokenizer.model"
RUN_TOKENIZER_DIR = "tokenizer"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
RUN_FORMAT = "spark-training-run"
# Every file an export may hold: the tokenizer's are whichever its kind writes.
EXPORT_FILES = (checkpoint.CONFIG_FILE, *checkpoint.TOKENIZER_FILES, checkpoint.PARAMS_DIR)


def sync(name: str) -> None:
    """Wait until every process gets here (nothing to wait for with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def is_training_dir(out: Path) -> bool:
    return (out / RUN_DIR / RUN_FILE).is_file()


def check_out(out: Path, resume: bool) -> dict | None:
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


def write_run_file(out: Path, run_info: dict) -> None:
    """Write <out>/training/run.json atomically."""
    tmp = out / RUN_DIR / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(run_info, indent=2))
    os.replace(tmp, out / RUN_DIR / RUN_FILE)


def start_run(out: Path, tc: TrainConfig, cfg: ModelConfig, tokenizer, info: dict,
              init: dict | None = None, corpus_manifest: dict | None = None) -> None:
    """Make <out>/training/ with the run's tokenizer, corpus manifest and run.json (process 0
    only; run.json last, as it marks the directory a run); `init` describes the model an
    --init run starts from."""
    (out / RUN_DIR).mkdir(parents=True, exist_ok=True)
    if corpus_manifest is not None:
        from train.manifest import MANIFEST_FILE, write
        write(out / RUN_DIR / MANIFEST_FILE, corpus_manifest)
    from spark_model.tokenizer import Tokenizer
    if isinstance(tokenizer, Tokenizer):
        tokenizer.save(out / RUN_DIR / RUN_TOKENIZER)
    else:
        tokenizer.save_to_dir(out / RUN_DIR / RUN_TOKENIZER_DIR)
    run = {"format": RUN_FORMAT, "settings": tc.to_json_dict(), "model": cfg.to_dict(),
           "data": info}
    if init is not None:
        run["init"] = init
    write_run_file(out, run)


def load_run_tokenizer(out: Path):
    """The tokenizer a run in `out` trains with."""
    from spark_model.tokenizer import Tokenizer
    from spark_model.tokenizers_io import load_tokenizer

    if (out / RUN_DIR / RUN_TOKENIZER).is_file():
        return Tokenizer.load(out / RUN_DIR / RUN_TOKENIZER)
    return load_tokenizer(out / RUN_DIR / RUN_TOKENIZER_DIR)


def record_extension(out: Path, stored: dict, steps: int, lead: bool, say) -> dict:
    """Rewrite run.json for a run extended to `steps`, keeping the history of its lengths."""
    before = stored["settings"]["steps"]
    say(f"extending the run from {before} to {steps} steps: the learning rate now follows "
        f"the cosine over {steps} steps from the resumed step on")
    stored = {**stored, "settings": {**stored["settings"], "steps": steps},
              "extensions": [*stored.get("extensions", []), {"from": before, "to": steps}]}
    if lead:
        write_run_file(out, stored)
    sync("spark-train-extended")
    return stored


def export(out: Path, host_params: dict[str, np.ndarray], cfg: ModelConfig, tokenizer,
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
            if (new / name).exists():
                (new / name).rename(out / name)
        (new / checkpoint.MANIFEST_FILE).rename(out / checkpoint.MANIFEST_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
