"""The optimizer: AdamW with linear warmup and cosine decay, after global-norm clipping."""

from __future__ import annotations

from typing import Sequence

import optax

from train.config import TrainConfig


def decay_mask(names: Sequence[str], shapes: dict[str, tuple]) -> dict[str, bool]:
    """Weight decay on matrices only: not on norm scales (1-D) nor the token embedding."""
    return {n: len(shapes[n][0]) >= 2 and n != "embed" for n in names}


def make_schedule(tc: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=tc.warmup, decay_steps=tc.steps,
        end_value=tc.lr * tc.min_lr_ratio)


def make_optimizer(tc: TrainConfig, mask: dict[str, bool]) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(tc.clip),
        optax.adamw(make_schedule(tc), b1=tc.b1, b2=tc.b2, eps=1e-8,
                    weight_decay=tc.weight_decay, mask=mask))
