"""Training on source code: corpus, tokenizer, token cache, optax loop, JAX sharding, orbax.

Command line (``spark train``, this package's entry in the ``spark.commands`` group;
``python -m train`` is the same)::

    spark train --preset tiny --out runs/tiny --steps 2000
    spark train --out runs/tiny --resume                # continue after a crash or Ctrl-C

    import spark_model
    m = spark_model.load("runs/tiny")                   # the run directory is a checkpoint

Modules:
  corpus.py     load_corpus(sources) -> (documents, stats): the stdlib by default, the
                named sources "stdlib" and "site-packages", directories (*.py,
                recursively), .jsonl files ("text"/"content" per line) and single files;
                unreadable / non-UTF-8 / empty / oversized documents are skipped and
                counted, exact copies kept once. split_corpus(docs) -> (train, validation)
                by sha256(name relative to its root) % 1000 < 20; validation_files() gives
                the held-out files for evaluation (eval.bpb.bits_per_byte(model, files)).
  site_sources.py  the installed dependency closure of spark-model (the "site-packages"
                source) and outside_closure(): installed code training never sees.
  repo_order.py repo_order(docs): the training stream package by package, each module
                before the modules that import it.
  manifest.py   the corpus manifest a run saves (name, bytes, SHA-256 per document) and
                its check on --resume.
  data.py       train_or_load_tokenizer (trained on the training split only, cached),
                build_token_cache (BOS text EOS streams in ~/.cache/spark/tokens-<key>/,
                memory-mapped, uint16 when the vocabulary fits; rebuilt only when
                documents, tokenizer or seq_len change), BatchIterator (seeded per-epoch
                permutation of packed sequences, state = one integer position), eval_set
                (bits-per-byte windows).
  fim_transform.py  the fill-in-the-middle transform of training documents (--fim-rate):
                PSM or SPM examples laid out as spark_model.fim.prompt_ids + middle + EOS.
  init.py       load_init (--init MODEL) and add_fim_tokens (--add-fim-tokens: FIM control
                pieces appended, embedding rows grown at the mean embedding).
  config.py     TrainConfig (every setting of a run), RUN_FIELDS (those a resumed run
                keeps), validate, TrainError and SettingsError; imports no JAX.
  loss.py       token_nll: per-token cross-entropy of the model's own forward pass
                (Transformer.hidden with spark_model.flash_attention, memory linear in
                the sequence, then logits over chunks of tokens).
  params.py     ParamTree: the model <-> a flat {dotted name: array} dict.
  optim.py      AdamW with warmup/cosine and clipping; the weight-decay mask.
  sharding.py   make_mesh (1-D "data" mesh) and fsdp_spec (optional FSDP).
  trainer.py    Trainer: one jitted train step (optional gradient accumulation, sharded
                over the mesh), the eval step, fresh parameters, the orbax restore target.
  rundir.py     the run directory: layout, --out/--resume checks, run.json, the export of
                the model as a spark checkpoint.
  metrics.py    metrics.jsonl lines and the loss.png plot.
  loop.py       train(config, out, resume=...): the run, with orbax checkpoints, evals and
                exports. See its docstring for multi-host use.
  launch.py     --distributed: the launch settings, a handshake of the processes that fails
                in one line within --distributed-timeout, then jax.distributed.initialize.
  cli.py        add_arguments(parser), run(args) -> exit code, main(argv), and
                `command`, the `spark train` entry.

Multi-host: run the same command on every host with ``--distributed`` (which calls
``jax.distributed.initialize()``; set JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID, or let a cluster environment such as SLURM provide them) and an ``--out``
and ``--cache-dir`` on a filesystem every host shares.
"""
