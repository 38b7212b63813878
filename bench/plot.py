"""Bar charts of benchmark tables (PNG), for the README. Needs matplotlib (the ``bench``
extra: ``pip install -e '.[bench]'``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def bars(path: Path, title: str, labels: Sequence[str], values: Sequence[float],
         unit: str, highlight: str = "tessera") -> None:
    """One horizontal bar per row, tessera's in one colour and peers' in another."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.2))
    colours = ["tab:blue" if label.startswith(highlight) else "tab:gray" for label in labels]
    ax.barh(list(labels), list(values), color=colours)
    ax.invert_yaxis()
    ax.set_xlabel(unit)
    ax.set_title(title, fontsize=10)
    for y, value in enumerate(values):
        ax.text(value, y, f" {value:.1f}", va="center", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
