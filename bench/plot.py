"""Bar charts of benchmark tables (PNG), for the README. Needs matplotlib (the ``bench``
extra: ``pip install -e '.[bench]'``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def check() -> None:
    """Fail at once where matplotlib is missing (a benchmark calls this before it runs)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("the plot needs matplotlib: pip install -e '.[bench]' "
                         "(or pass --plot '')") from None


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


def lines(path: Path, title: str, series: dict[str, tuple[Sequence[float], Sequence[float]]],
          xlabel: str, ylabel: str, ylim: tuple[float, float] | None = None) -> None:
    """One line (with markers) per named series of ``(xs, ys)``, a legend beside them."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", markersize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
