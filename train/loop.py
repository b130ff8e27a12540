"""The training run: train(config, out, resume=...) prepares the data, builds the Trainer,
starts or resumes the run directory (train/rundir.py) and loops: optimizer steps, metrics
lines, validation evals, orbax checkpoints with the exported model, and at the end the
full validation split, the final export and the loss plot.

Multi-host: call ``jax.distributed.initialize()`` before anything else touches JAX (the CLI
does it with ``--distributed``); `jax.devices()` then lists every host's devices, the mesh
spans them, and every process runs this same code: each builds the same global batch from
the same cache and `jax.make_array_from_callback` keeps only its own shards. The run
directory must be on a filesystem all hosts share; orbax writes the checkpoints
collectively, process 0 writes the exported model, metrics and plot. Every process checks that it
prepared the same tokens as process 0 (`_check_same_tokens`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh

from spark_model.config import ModelConfig
from train import corpus as corpus_mod
from train import data as data_mod
from train import manifest as manifest_mod
from train import rundir
from train.config import TrainConfig, TrainError, check_seq_len, validate
from train.metrics import Metrics, plot_metrics
from train.pose import batch_positions
from train.rundir import METRICS_FILE, PLOT_FILE, RUN_DIR, STATE_DIR
from train.trainer import Trainer

KILL_ENV = "SPARK_TRAIN_KILL_AT_STEP"  # tests: SIGKILL self right after this step's save


def _quiet() -> None:
    for name in ("absl", "orbax", "jax._src.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _say(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def prepare_data(tc: TrainConfig, tokenizer=None, cache_dir=None, say=_say,
                 saved_manifest: dict | None = None, out: Path | None = None):
    """Corpus -> (check against a resumed run's `saved_manifest`) -> split -> tokenizer
    (trained on the training split unless given) -> (repository order) -> cache. Returns
    (tokenizer, data, info, validation files, the corpus manifest)."""
    t0 = time.perf_counter()
    docs, stats = corpus_mod.load_corpus(tc.data or None)
    corpus_manifest = manifest_mod.build(docs, tc.data or (corpus_mod.STDLIB,))
    if saved_manifest is not None:
        manifest_mod.check(saved_manifest, docs, out)
    train_docs, val_docs = corpus_mod.split_corpus(docs, tc.val_permille)
    what = ", ".join(tc.data) if tc.data else "the Python standard library"
    say(f"corpus: {what}: {stats.summary()}; {len(train_docs)} train / "
        f"{len(val_docs)} validation ({time.perf_counter() - t0:.1f}s)")
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
    if tc.fim_rate and getattr(tokenizer, "fim", None) is None:
        from train.config import SettingsError
        raise SettingsError(f"--fim-rate {tc.fim_rate}: the tokenizer has no fill-in-the-middle "
                            "tokens (with --init, add them with --add-fim-tokens)")
    t0 = time.perf_counter()
    stream_docs = train_docs
    if tc.repo_order:  # the tokenizer above saw the corpus order: its cache key is unchanged
        from train.repo_order import repo_order
        stream_docs = repo_order(train_docs)
    data, built = data_mod.build_token_cache(stream_docs, val_docs, tokenizer, tc.seq_len,
                                             cache_dir, fim_rate=tc.fim_rate, fim_seed=tc.seed,
                                             fim_lines=tc.fim_lines)
    if tc.fim_rate:
        from train.fim_transform import count_transformed
        n_fim = count_transformed(train_docs, tc.fim_rate, tc.seed)
        say(f"fill-in-the-middle: {n_fim} of {len(train_docs)} training documents "
            f"({n_fim / len(train_docs):.1%}; rate {tc.fim_rate}), about half in spm order"
            + (f", {tc.fim_lines:.0%} of them cut at line starts" if tc.fim_lines else ""))
    say(f"tokens: {len(data.train):,} train in {data.n_sequences:,} sequences of "
        f"{tc.seq_len}, {len(data.val):,} validation ({'built' if built else 'cached'} "
        f"{data.path}, {time.perf_counter() - t0:.1f}s)")
    info = {"corpus": stats.as_dict(), "train_docs": len(train_docs),
            "val_docs": len(val_docs), "train_fingerprint": corpus_mod.fingerprint(train_docs),
            "val_fingerprint": corpus_mod.fingerprint(val_docs)}
    val_files = [d.path for d in val_docs if d.path is not None]
    return tokenizer, data, info, val_files, corpus_manifest


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
    stored = rundir.check_out(out, resume)
    lead = jax.process_index() == 0
    rundir.sync("spark-train-checked")  # every process has looked at `out` before writing
    say = _say

    tokenizer = None
    if stored is not None:
        rundir.check_resume_settings(TrainConfig.from_json_dict(stored["settings"]), tc, out)
        tokenizer = rundir.load_run_tokenizer(out)
    init_model = _load_start(tc, stored, out, say)
    if init_model is not None and tc.add_fim_tokens:
        from train.init import add_fim_tokens
        init_model = add_fim_tokens(init_model)
        say(f"init: {init_model.description}")
    if init_model is not None and tokenizer is None:
        tokenizer = init_model.tokenizer
    if tc.init is not None:  # the model's own config; a resumed run reads it from run.json
        cfg = init_model.cfg if init_model is not None else ModelConfig.from_dict(stored["model"])
        check_seq_len(tc, cfg)
    saved_manifest = None
    if stored is not None:  # None for runs saved before manifests: they resume as before
        saved_manifest = manifest_mod.read(out / RUN_DIR / manifest_mod.MANIFEST_FILE)
    tokenizer, data, info, val_files, corpus_manifest = prepare_data(
        tc, tokenizer, cache_dir, say, saved_manifest, out)
    _check_same_tokens(data)
    if stored is not None:
        for k in ("train_fingerprint", "val_fingerprint"):
            if stored["data"].get(k) != info[k]:
                raise TrainError(f"the corpus changed since the run in {out} started "
                                 f"({k.split('_')[0]} documents differ); cannot resume exactly")
    if tc.init is None:
        cfg = tc.model_config(tokenizer.vocab_size)
    trainer = Trainer(cfg, tc, mesh, base=init_model.params if tc.lora_rank else None)
    if stored is not None and tc.steps != stored["settings"]["steps"]:
        stored = rundir.record_extension(out, stored, tc.steps, lead, say)

    manager_dir = out / RUN_DIR / STATE_DIR
    if stored is None and lead:
        rundir.start_run(out, tc, cfg, tokenizer, info, None if init_model is None else {
            "source": init_model.source, "description": init_model.description,
            "fingerprint": init_model.fingerprint}, corpus_manifest)
    rundir.sync("spark-train-run-written")
    options = ocp.CheckpointManagerOptions(max_to_keep=tc.keep, create=True)
    manager = ocp.CheckpointManager(manager_dir, options=options)
    try:
        return _run(tc, out, trainer, tokenizer, data, manager, resume, progress, lead, say,
                    init_model.params if init_model is not None and not tc.lora_rank else None,
                    val_files)
    finally:
        manager.close()


def _check_same_tokens(data: data_mod.TokenData) -> None:
    """Multi-process: every process must cut its batches from the same tokens. Each builds
    (or finds) its token cache itself, named by a hash of the documents, the tokenizer and
    the sequence length; compare those names, so that processes that read different files
    or trained different tokenizers stop here instead of training on different batches."""
    if jax.process_count() == 1:
        return
    import hashlib

    from jax.experimental import multihost_utils
    mine = np.frombuffer(hashlib.sha256(data.key.encode()).digest()[:16], np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine))  # (processes, 16)
    differ = [k for k in range(len(every)) if not np.array_equal(every[k], every[0])]
    if differ:
        raise TrainError(f"processes {differ} prepared other tokens than process 0 (token "
                         f"cache key {data.key} here): give every host the same "
                         "--data files and a shared --cache-dir")


def _load_start(tc: TrainConfig, stored: dict | None, out: Path, say):
    """The --init model (None without --init): loaded when a run starts, and when a LoRA
    run resumes (its frozen base weights live only there; they must not have changed)."""
    if tc.init is None or (stored is not None and not tc.lora_rank):
        return None
    from train.init import load_init
    t0 = time.perf_counter()
    start = load_init(tc.init)
    say(f"init: {start.description} ({time.perf_counter() - t0:.1f}s)")
    if stored is not None and stored.get("init", {}).get("fingerprint") != start.fingerprint:
        raise TrainError(f"--init {tc.init} no longer holds the weights the LoRA run in {out} "
                         "started from; cannot resume it")
    return start


def _run(tc, out, trainer, tokenizer, data, manager, resume, progress, lead, say,
         start_params=None, val_files=()) -> dict:
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
        params, opt_state = trainer.init(tc.seed, start_params)
    it = data_mod.BatchIterator(data, tc.batch_size, tc.seed, position)
    metrics = Metrics(out / METRICS_FILE, lead, start)
    eval_small = data_mod.eval_set(data, tc.eval_tokens)
    eval_full = data_mod.eval_set(data)
    tokens_per_step = tc.batch_size * tc.seq_len
    compile_s = trainer.compile(params, opt_state)
    trained = (f" ({trainer.n_trained:,} trained: LoRA rank {tc.lora_rank})"
               if tc.lora_rank else "")
    say(f"model: {trainer.n_params:,} parameters{trained}, "
        f"{trainer.n_dev} device(s), {'FSDP' if tc.fsdp else 'data parallel'}; "
        f"compiled the step in {compile_s:.1f}s")
    extra = {"train": {"steps": tc.steps, "seq_len": tc.seq_len, "train_seq_len": tc.seq_len,
                       "preset": None if tc.init else tc.preset, "bf16": tc.bf16}}
    if tc.init:
        extra["train"].update(init=tc.init, lora_rank=tc.lora_rank or None)
    if tc.fim_rate:
        extra["train"]["fim_rate"] = tc.fim_rate
        if tc.fim_lines:
            extra["train"]["fim_lines"] = tc.fim_lines
    if tc.target_context is not None:
        extra["train"].update(target_context=tc.target_context, pose_share=tc.pose_share,
                              pose_chunks=tc.pose_chunks)
    kill_at = int(os.environ.get(KILL_ENV, "0") or 0)

    def pose_positions(position: int) -> np.ndarray | None:
        """The batch's PoSE position ids (None: plain training), a function of the data
        position alone, so a resumed run draws the same ones."""
        if tc.target_context is None:
            return None
        return batch_positions(tc.seq_len, tc.target_context, tc.seed, position,
                               tc.batch_size, tc.pose_chunks, tc.pose_share)

    def save(step: int) -> None:
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            data=ocp.args.JsonSave({"step": step, "data": it.state(),
                                    "tokens_seen": step * tokens_per_step})), force=True)
        host = trainer.host_params(params)  # a collective when multi-process
        if lead:
            rundir.export(out, host, trainer.cfg, tokenizer, {**extra, "step": step})
        if kill_at and step == kill_at:
            manager.wait_until_finished()
            os.kill(os.getpid(), signal.SIGKILL)

    def lines(host: dict) -> dict:
        """Held-out next-line completion (process 0; {} when not asked for)."""
        if not (tc.line_samples and lead):
            return {}
        from train.line_eval import held_out_lines
        return held_out_lines(host, trainer.cfg, tokenizer, val_files, tc.line_samples,
                              tc.seq_len, tc.seed) or {}

    def line_text(r: dict) -> str:
        return (f"; line completion exact {r['line_exact_match']:.3f}, edit similarity "
                f"{r['line_edit_similarity']:.3f} ({r['line_samples']} held-out lines)"
                if "line_exact_match" in r else "")

    def do_eval(step: int, es: data_mod.EvalSet, full: bool, host: dict | None = None) -> dict:
        t0 = time.perf_counter()
        r = trainer.evaluate(params, es)
        if host is not None:
            r.update(lines(host))
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
    before: dict = {}
    if tc.init is not None and start == 0:  # where fine-tuning starts from, on held-out files
        before = do_eval(0, eval_full, True, trainer.host_params(params))
        say(f"before training: validation loss {before['val_loss']:.4f} nats/token, "
            f"{before['val_bpb']:.4f} bits/byte on {before['val_docs']} held-out files"
            + line_text(before))
    t_begin = time.perf_counter()
    try:
        for step in range(start + 1, tc.steps + 1):
            positions = pose_positions(it.position)  # before next() moves the position
            batch = it.next()
            params, opt_state, m = trainer.step(params, opt_state, batch, positions)
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
    host = trainer.host_params(params)
    final = do_eval(tc.steps, eval_full, True,  # the whole validation split
                    host if tc.init is not None else None)
    say(f"done: step {tc.steps}, validation loss {final['val_loss']:.4f} nats/token, "
        f"{final['val_bpb']:.4f} bits/byte on {final['val_docs']} held-out files"
        + (f" (before training: {before['val_bpb']:.4f})" if before else "")
        + line_text(final))
    plotted = False
    if lead:
        rundir.export(out, host, trainer.cfg, tokenizer,
                {**extra, "step": tc.steps, "val_bpb": final["val_bpb"],
                 "val_loss": final["val_loss"]})
        plotted = plot_metrics(out / METRICS_FILE, out / PLOT_FILE)
        if not plotted:
            say("note: matplotlib is not installed; no loss.png written")
    return {"out": str(out), "step": tc.steps, "start_step": start, "final": final,
            "before": before,
            "last_train": last_train, "compile_s": compile_s, "plotted": plotted,
            "params": params}
