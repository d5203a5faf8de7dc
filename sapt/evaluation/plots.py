"""Pictures of a run: the accuracy matrix and the shared-attention weights as heatmaps (PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _short(names: list[str]) -> list[str]:
    return [n if len(n) <= 18 else n[:16] + ".." for n in names]


def _annotated_heatmap(values: np.ndarray, path: Path, *, title: str, vmax: float, cmap: str, cell_format: str,
                       x_labels: list[str], y_labels: list[str], x_title: str, y_title: str = "") -> Path:
    """A square heatmap with each known cell written in it; NaN cells stay blank."""
    size = values.shape[0]
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * size, 1.0 + 0.6 * size))
    image = ax.imshow(values, vmin=0, vmax=vmax, cmap=cmap)
    for j in range(size):
        for i in range(size):
            if not np.isnan(values[j, i]):
                ax.text(i, j, format(values[j, i], cell_format), ha="center", va="center",
                        color="white" if values[j, i] < 0.6 * vmax else "black", fontsize=8)
    ax.set_xticks(range(size), x_labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(size), y_labels, fontsize=8)
    ax.set_xlabel(x_title)
    if y_title:
        ax.set_ylabel(y_title)
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def matrix_heatmap(matrix: list[list[float | None]], task_names: list[str], path: Path, title: str) -> Path:
    """Draws a[j][i] (row: after training task j, column: task i); empty cells stay blank."""
    values = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    return _annotated_heatmap(values, path, title=title, vmax=100, cmap="viridis", cell_format=".0f",
                              x_labels=_short(task_names), y_labels=[f"after {j + 1}" for j in range(len(task_names))],
                              x_title="evaluated task")


def attention_heatmap(weights: list[list[float | None] | None], task_names: list[str], path: Path,
                      title: str) -> Path:
    """Mean shared-attention weights: row = the task whose inputs are routed, column = PET block."""
    size = len(task_names)
    values = np.array([[np.nan if row is None or v is None else v for v in (row or [None] * size)]
                       for row in weights], dtype=float)
    return _annotated_heatmap(values, path, title=title, vmax=1, cmap="magma", cell_format=".2f",
                              x_labels=[f"block {i + 1}" for i in range(size)], y_labels=_short(task_names),
                              x_title="PET block (task order)", y_title="inputs of task")
