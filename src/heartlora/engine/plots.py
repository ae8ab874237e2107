"""The two figures of a run: the layers × heads responsiveness heatmap and the training curves."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

from heartlora._paths import atomic_path


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def responsiveness_heatmap(
    path: str | Path,
    scores: Mapping[str, Sequence[float]] | None,
    masks: Mapping[str, Sequence[bool]],
    title: str = "",
) -> Path:
    """Save a heatmap with one row per attention layer and one column per head; switched-off heads get an ×.

    Layers may have different head counts (Swin stages): missing cells stay blank. Without scores (a file saved
    without them) the map shows on/off only. Scores are divided by the largest, so the colours compare heads
    across the whole model, as the global ranking does.
    """
    layers = list(masks) if masks else list(scores or {})
    width = max((len(masks.get(name, (scores or {}).get(name, ()))) for name in layers), default=1)
    grid = np.full((max(len(layers), 1), max(width, 1)), np.nan)
    for i, name in enumerate(layers):
        row = (scores or {}).get(name)
        if row is None:
            row = [1.0 if on else 0.0 for on in masks[name]]
        grid[i, : len(row)] = np.asarray([float(v) for v in row], dtype=float)
    top = np.nanmax(grid) if np.isfinite(grid).any() else 1.0
    if scores and top > 0:
        grid = grid / top

    # The Figure API draws without pyplot's global state or a display backend (files only).
    fig = Figure(figsize=(min(max(6.0, 3.5 + 0.45 * width), 14), min(2.0 + 0.32 * len(layers), 14)))
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0)
    for i, name in enumerate(layers):
        for h, on in enumerate(masks.get(name, ())):
            if not on:
                ax.text(h, i, "×", ha="center", va="center", color="red", fontsize=12, fontweight="bold")
    ax.set_xticks(range(width))
    ax.set_xlabel("attention head")
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([f"{i}: {_short(n)}" for i, n in enumerate(layers)], fontsize=7)
    ax.set_ylabel("attention layer")
    off = sum(1 for m in masks.values() for on in m if not on)
    total = sum(len(m) for m in masks.values())
    what = "responsiveness (÷ max)" if scores else "no head was scored: on = 1, off = 0"
    ax.set_title(f"{title}\n{what}; × = switched off ({off}/{total} heads)".strip(), fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    return _save(fig, path, dpi=110)


def training_curves(path: str | Path, history: Sequence[Mapping[str, Any]], warmup_epochs: int = 0,
                    title: str = "") -> Path:
    """Save loss, accuracy and learning rate per epoch; a dashed line marks the end of warmup (scoring)."""
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(12, 3.4))
    axes = fig.subplots(1, 3)
    axes[0].plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    axes[0].set_title("loss")
    axes[1].plot(epochs, [h["train_acc"] for h in history], marker="o", label="train")
    evals = [(h["epoch"], h["eval_acc"]) for h in history if h.get("eval_acc") is not None]
    if evals:
        split = next(h.get("eval_split", "eval") for h in history if h.get("eval_acc") is not None)
        axes[1].plot(*zip(*evals), marker="s", label=split)
    axes[1].set_title("accuracy")
    axes[2].plot(epochs, [h["lr"] for h in history], marker=".")
    axes[2].set_title("learning rate (end of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if warmup_epochs and history:
            ax.axvline(warmup_epochs, color="grey", linestyle="--", linewidth=1)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path, dpi=100)


def heatmap_grid(path: str | Path,
                 panels: Mapping[str, tuple[Mapping[str, Sequence[float]], Mapping[str, Sequence[bool]]]],
                 title: str = "") -> Path:
    """One layers × heads responsiveness panel per name (scores ÷ each panel's largest, × on heads switched off),
    side by side, saved to ``path``: which heads several tasks or seeds share."""
    fig = Figure(figsize=(min(3.0 + 2.6 * len(panels), 24), 5.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    image = None
    for ax, (name, (scores, masks)) in zip(axes, panels.items()):
        width = max(len(v) for v in scores.values())
        grid = np.full((len(scores), width), np.nan)
        for i, row in enumerate(scores.values()):
            grid[i, :len(row)] = [float(x) for x in row]
        top = np.nanmax(grid)
        image = ax.imshow(np.ma.masked_invalid(grid / top if top > 0 else grid), aspect="auto", cmap=cmap,
                          vmin=0.0, vmax=1.0)
        for i, layer in enumerate(scores):
            for h, on in enumerate(masks.get(layer, ())):
                if not on:
                    ax.text(h, i, "×", ha="center", va="center", color="red", fontsize=9, fontweight="bold")
        ax.set_title("\n".join(line if len(line) <= 30 else "…" + line[-29:] for line in name.split("\n")),
                     fontsize=8)
        ax.set_xlabel("head")
    axes[0].set_ylabel("attention layer")
    if image is not None:
        fig.colorbar(image, ax=list(axes), fraction=0.02, pad=0.02)
    marked = any(not on for _, masks in panels.values() for row in masks.values() for on in row)
    fig.suptitle((f"{title}\nresponsiveness (÷ each panel's max)" + ("; × = switched off" if marked else "")).strip(),
                 fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return Path(path)


def _save(fig: Figure, path: str | Path, dpi: int) -> Path:
    """Lay out and write atomically as PNG."""
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path

