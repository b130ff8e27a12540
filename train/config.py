"""What defines a training run: TrainConfig, the settings a resumed run must keep, their
validation, and the two errors training reports. Imports no JAX (``spark train --help``
reads the defaults from here)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from spark_model.config import ModelConfig
from train.corpus import DEFAULT_VAL_PERMILLE
from train.pose import DEFAULT_CHUNKS, DEFAULT_SHARE


class TrainError(RuntimeError):
    """A training run that cannot start or continue; the message says why, in one line."""


class SettingsError(ValueError):
    """Settings that cannot work (a usage error)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run. Fields in RUN_FIELDS are fixed once a run starts."""

    preset: str = "tiny"
    init: str | None = None  # start from this model (spark_model.load's argument), not a preset
    lora_rank: int = 0  # > 0: train low-rank adapters of this rank instead of every weight
    lora_alpha: float | None = None  # adapter scale alpha / rank; None: 2 * rank (scale 2)
    overrides: tuple[tuple[str, Any], ...] = ()  # ModelConfig fields, e.g. (("d_model", 32),)
    vocab_size: int | None = None  # None: the preset's
    data: tuple[str, ...] = ()  # sources (directories, .jsonl, files); () = the stdlib
    val_permille: int = DEFAULT_VAL_PERMILLE
    seq_len: int = 512
    batch_size: int = 8  # sequences per optimizer step (all devices, all micro-batches)
    steps: int = 2000
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    warmup: int = 100
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip: float = 1.0
    seed: int = 0
    bf16: bool = False  # bf16 compute, f32 master weights
    repo_order: bool = False  # train stream in repository order (train/repo_order.py); False
    # in runs saved before it existed, True for new runs from the CLI
    fim_rate: float = 0.0  # share of training documents made fill-in-the-middle examples
    fim_lines: float = 0.0  # share of those cut at line starts (train/fim_transform.py)
    add_fim_tokens: bool = False  # with init: append FIM control pieces to its vocabulary
    # PoSE (train/pose.py): position ids spread over [0, target_context); None: plain ids
    target_context: int | None = None
    pose_share: float = DEFAULT_SHARE  # share of sequences given skips
    pose_chunks: int = DEFAULT_CHUNKS  # chunks per skipped sequence
    # Free to change when resuming:
    grad_accum: int = 1  # micro-batches per step (batch_size / grad_accum sequences each)
    fsdp: bool = False
    log_every: int = 10
    eval_every: int = 250  # 0: only at the end
    eval_tokens: int = 65_536  # validation tokens scored at each interval (whole files)
    save_every: int = 250  # 0: only at the end
    keep: int = 3
    line_samples: int = 0  # held-out next-line completions scored before and after (0: none)

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        """The model trained and exported: the preset with the overrides and the vocabulary
        (`vocab_size`, else the setting, else the preset's). With `bf16` the Trainer
        computes in a copy of it with dtype bfloat16; the parameters keep its param_dtype."""
        vocab = vocab_size or self.vocab_size
        extra = {"vocab_size": vocab} if vocab else {}
        return ModelConfig.preset(self.preset, **dict(self.overrides), **extra)

    @property
    def lora_scale(self) -> float:
        alpha = self.lora_alpha if self.lora_alpha is not None else 2.0 * self.lora_rank
        return alpha / self.lora_rank if self.lora_rank else 0.0

    def to_json_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["overrides"] = {k: v for k, v in self.overrides}
        d["data"] = list(self.data)
        return d

    @classmethod
    def from_json_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["overrides"] = tuple(sorted(d.get("overrides", {}).items()))
        d["data"] = tuple(d.get("data", ()))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# Settings a resumed run must share with the run it continues (--steps may only grow).
RUN_FIELDS = ("preset", "init", "lora_rank", "lora_alpha", "overrides", "vocab_size", "data",
              "val_permille", "seq_len", "batch_size", "lr", "min_lr_ratio", "warmup",
              "weight_decay", "b1", "b2", "clip", "seed", "bf16", "repo_order")
# fill-in-the-middle (train/fim_transform.py)
RUN_FIELDS += ("fim_rate", "add_fim_tokens", "fim_lines")
RUN_FIELDS += ("target_context", "pose_share", "pose_chunks")  # PoSE (train/pose.py)


def validate(tc: TrainConfig) -> None:
    """Raise SettingsError (a usage error) for settings that cannot work."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise SettingsError(msg)
    need(tc.steps >= 1, f"--steps must be at least 1, got {tc.steps}")
    need(tc.batch_size >= 1, f"--batch-size must be at least 1, got {tc.batch_size}")
    need(tc.seq_len >= 2, f"--seq-len must be at least 2, got {tc.seq_len}")
    need(tc.grad_accum >= 1, f"--grad-accum must be at least 1, got {tc.grad_accum}")
    need(tc.batch_size % tc.grad_accum == 0,
         f"--batch-size ({tc.batch_size}) must be a multiple of --grad-accum ({tc.grad_accum})")
    need(math.isfinite(tc.lr) and tc.lr >= 0, f"--lr must be >= 0, got {tc.lr}")
    need(0 <= tc.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {tc.min_lr_ratio}")
    need(0 <= tc.warmup < tc.steps,
         f"--warmup must be in [0, --steps) = [0, {tc.steps}), got {tc.warmup}")
    need(tc.weight_decay >= 0, f"--weight-decay must be >= 0, got {tc.weight_decay}")
    need(tc.clip > 0, f"--clip must be positive, got {tc.clip}")
    need(tc.log_every >= 1, f"--log-every must be at least 1, got {tc.log_every}")
    need(tc.eval_every >= 0, f"--eval-every must be >= 0, got {tc.eval_every}")
    need(tc.eval_tokens >= 1, f"--eval-tokens must be at least 1, got {tc.eval_tokens}")
    need(tc.save_every >= 0, f"--save-every must be >= 0, got {tc.save_every}")
    need(tc.keep >= 1, f"--keep must be at least 1, got {tc.keep}")
    need(tc.line_samples >= 0, f"--line-samples must be >= 0, got {tc.line_samples}")
    check_pose(tc)
    need(0 <= tc.val_permille < 1000,
         f"--val-permille must be in [0, 1000), got {tc.val_permille}")
    if tc.vocab_size is not None:
        from spark_model.tokenizer import MIN_VOCAB_SIZE
        need(tc.vocab_size >= MIN_VOCAB_SIZE,
             f"--vocab-size must be at least {MIN_VOCAB_SIZE}, got {tc.vocab_size}")
        need(tc.vocab_size <= 65536 * 4, f"--vocab-size {tc.vocab_size} is implausibly large")
    need(tc.lora_rank >= 0, f"--lora must be at least 1, got {tc.lora_rank}")
    need(not tc.lora_rank or tc.init is not None,
         "--lora adapts an existing model: give it with --init")
    if tc.lora_alpha is not None:
        need(math.isfinite(tc.lora_alpha) and tc.lora_alpha > 0,
             f"--lora-alpha must be positive, got {tc.lora_alpha}")
    need(isinstance(tc.fim_rate, (int, float)) and 0 <= tc.fim_rate <= 1,
         f"--fim-rate must be in [0, 1], got {tc.fim_rate}")  # NaN fails both comparisons
    need(isinstance(tc.fim_lines, (int, float)) and 0 <= tc.fim_lines <= 1,
         f"--fim-lines must be in [0, 1], got {tc.fim_lines}")
    need(not tc.fim_lines or tc.fim_rate, "--fim-lines shapes the documents --fim-rate "
         "rearranges: give --fim-rate above 0")
    need(not tc.add_fim_tokens or tc.init is not None,
         "--add-fim-tokens extends an existing model's vocabulary: give it with --init")
    need(not (tc.add_fim_tokens and tc.lora_rank),
         "--add-fim-tokens grows the embedding, which --lora adapters do not train")
    if tc.init is not None:  # the model's own config, checked once it is loaded
        need(not tc.overrides, "--set changes a preset; an --init model keeps its own config")
        need(tc.vocab_size is None, "--vocab-size trains a new tokenizer; an --init model keeps "
                                    "its own")
        return
    cfg = tc.model_config()  # ConfigError (a ValueError) for bad presets/overrides
    check_seq_len(tc, cfg)


def check_seq_len(tc: TrainConfig, cfg: ModelConfig) -> None:
    """A usage error when the training sequences (or their PoSE positions) do not fit the
    model's context."""
    if tc.seq_len > cfg.max_seq_len:
        raise SettingsError(f"--seq-len {tc.seq_len} exceeds the model's max_seq_len "
                            f"{cfg.max_seq_len}")
    if tc.target_context is None:
        return
    if tc.target_context > cfg.max_seq_len:
        raise SettingsError(f"--target-context {tc.target_context} exceeds the model's "
                            f"max_seq_len {cfg.max_seq_len}")
    # Positions must not alias: the slowest rotary pair may not complete a turn within the
    # target, else two distances below it look alike to that pair.
    from train.pose import longest_wavelength  # imports JAX
    wave = longest_wavelength(cfg)
    if wave < tc.target_context:
        raise SettingsError(
            f"--target-context {tc.target_context} is beyond what the model's rope settings "
            f"represent: its longest rotary wavelength (rope_theta {cfg.rope_theta:g}, "
            f"head_dim {cfg.head_dim}, scaling {_scaling_text(cfg)}) is {wave:,.0f} tokens")


def _scaling_text(cfg: ModelConfig) -> str:
    s = cfg.rope_scaling
    return "none" if s is None else f"{s.kind} x{s.factor:g}"


def check_pose(tc: TrainConfig) -> None:
    """Usage errors for the PoSE settings (the model-dependent ones: check_seq_len)."""
    if tc.target_context is None:
        if (tc.pose_share, tc.pose_chunks) != (DEFAULT_SHARE, DEFAULT_CHUNKS):
            raise SettingsError("--pose-share and --pose-chunks need --target-context")
        return
    if tc.target_context <= tc.seq_len:
        raise SettingsError(f"--target-context {tc.target_context} must exceed --seq-len "
                            f"{tc.seq_len} (positions reach past the training window)")
    if not (math.isfinite(tc.pose_share) and 0 <= tc.pose_share <= 1):
        raise SettingsError(f"--pose-share must be in [0, 1], got {tc.pose_share}")
    if not 2 <= tc.pose_chunks <= tc.seq_len:
        raise SettingsError(f"--pose-chunks must be in [2, --seq-len], got {tc.pose_chunks}")
