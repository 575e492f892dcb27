"""The training curves as a PNG: per-step train loss (faint), evaluated train and val loss (bold)."""

from __future__ import annotations

import os
from collections.abc import Iterable

from matplotlib.figure import Figure  # no pyplot: no global state, so drawing in a thread is safe


def plot_losses(records: Iterable[dict], path: str | os.PathLike, title: str = "") -> None:
    """Draws the loss curves of metrics.jsonl records (dicts with 'step' and 'loss' or 'val_loss')."""
    records = list(records)
    steps = [r["step"] for r in records if "loss" in r]
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    fig = Figure(figsize=(8, 5), dpi=100)
    ax = fig.add_subplot()
    if steps:
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="train (batch)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["train_loss"] for r in evals], "o-", color="tab:blue",
                label="train (estimate)")
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:orange", label="val")
        best = min(evals, key=lambda r: r["val_loss"])
        ax.annotate(f"best val {best['val_loss']:.4f}", (best["step"], best["val_loss"]),
                    textcoords="offset points", xytext=(0, -18), ha="center", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss (nats)")
    ax.set_title(title or "training loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, path)  # a viewer never sees a half-written file
