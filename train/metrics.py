"""Training metrics: JSON lines in <out>/metrics.jsonl, and their plot, <out>/loss.png."""

from __future__ import annotations

import json
from pathlib import Path


class Metrics:
    """Appends JSON lines to <out>/metrics.jsonl (process 0 only)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int):
        self.path = path
        self.enabled = enabled
        if enabled and resume_step and path.exists():
            # Drop what a killed run logged after its last checkpoint: it is redone.
            keep = []
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("step", 0) <= resume_step:
                    keep.append(line)
            path.write_text("".join(l + "\n" for l in keep))
        elif enabled and not resume_step:
            path.write_text("")

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def plot_metrics(metrics_path: Path, png_path: Path) -> bool:
    """Loss curves as a PNG: train loss and validation loss (left), validation bits per
    byte (right); interval evals (a fixed subset of files) and the final full-split eval
    are drawn apart, since they score different files."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train, sub, full = [], [], []
    for line in metrics_path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("kind") == "train":
            train.append((rec["step"], rec["loss"]))
        elif rec.get("kind") == "eval":
            (full if rec.get("full") else sub).append(
                (rec["step"], rec["val_loss"], rec["val_bpb"]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        ax1.plot(*zip(*train), lw=1, label="train loss")
    for series, style, color, label in ((sub, "o-", "C1", "validation subset"),
                                        (full, "*", "C3", "full validation split")):
        if series:
            steps = [v[0] for v in series]
            for ax, col in ((ax1, 1), (ax2, 2)):
                ax.plot(steps, [v[col] for v in series], style, color=color,
                        ms=10 if style == "*" else 4, label=label)
    ax1.set_xlabel("step")
    ax1.set_ylabel("cross-entropy (nats/token)")
    ax2.set_xlabel("step")
    ax2.set_ylabel("validation bits per byte")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return True
