"""Pictures of a run: the accuracy matrix as a heatmap PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def matrix_heatmap(matrix: list[list[float | None]], task_names: list[str], path: Path, title: str) -> Path:
    """Draws a[j][i] (row: after training task j, column: task i); empty cells stay blank."""
    size = len(task_names)
    values = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * size, 1.0 + 0.6 * size))
    image = ax.imshow(values, vmin=0, vmax=100, cmap="viridis")
    for j in range(size):
        for i in range(size):
            if not np.isnan(values[j, i]):
                ax.text(i, j, f"{values[j, i]:.0f}", ha="center", va="center",
                        color="white" if values[j, i] < 60 else "black", fontsize=8)
    short = [n if len(n) <= 18 else n[:16] + ".." for n in task_names]
    ax.set_xticks(range(size), short, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(size), [f"after {j + 1}" for j in range(size)], fontsize=8)
    ax.set_xlabel("evaluated task")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def attention_heatmap(weights: list[list[float | None] | None], task_names: list[str], path: Path,
                      title: str) -> Path:
    """Mean shared-attention weights: row = the task whose inputs are routed, column = PET block."""
    size = len(task_names)
    values = np.array([[np.nan if row is None or v is None else v for v in (row or [None] * size)]
                       for row in weights], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * size, 1.0 + 0.6 * size))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="magma")
    for j in range(size):
        for i in range(size):
            if not np.isnan(values[j, i]):
                ax.text(i, j, f"{values[j, i]:.2f}", ha="center", va="center",
                        color="white" if values[j, i] < 0.6 else "black", fontsize=7)
    short = [n if len(n) <= 18 else n[:16] + ".." for n in task_names]
    ax.set_xticks(range(size), [f"block {i + 1}" for i in range(size)], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(size), short, fontsize=8)
    ax.set_xlabel("PET block (task order)")
    ax.set_ylabel("inputs of task")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
