"""Static plots for the HTML reports, as PNG bytes (matplotlib's Agg canvas, no pyplot).

``Figure`` objects are used directly: no global pyplot state, no GUI backend, safe in any
process (Prefect workers, tests).  Each function takes plain Python data and returns PNG bytes,
or a small "no data" picture, so an empty run still renders a complete report.
"""

from __future__ import annotations

import io
import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from schemas.tables import SCORE_COLUMNS

DPI = 96
MAX_CITIES = 15


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _empty(title: str, size=(6.0, 2.0)) -> bytes:
    fig = Figure(figsize=size)
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(0.5, 0.5, f"{title}: no data", ha="center", va="center", fontsize=11)
    return _png(fig)


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def score_heatmap(hits: list[dict], title: str) -> bytes:
    """Mean of each perception score per city (cities with most hits first), n in the label."""
    by_city: dict[str, list[dict]] = {}
    for h in hits:
        by_city.setdefault(h.get("city") or "(no city)", []).append(h)
    cities = sorted(by_city, key=lambda c: (-len(by_city[c]), c))[:MAX_CITIES]
    if not cities:
        return _empty(title)
    grid = [[_mean([h.get(s) for h in by_city[c]]) for s in SCORE_COLUMNS] for c in cities]
    fig = Figure(figsize=(7.5, 0.45 * len(cities) + 1.6))
    ax = fig.add_subplot()
    masked = [[v if v is not None else float("nan") for v in row] for row in grid]
    im = ax.imshow(masked, aspect="auto", cmap="viridis", vmin=0, vmax=10)
    ax.set_xticks(range(len(SCORE_COLUMNS)), [s.replace("_", " ") for s in SCORE_COLUMNS],
                  rotation=20, ha="right")
    ax.set_yticks(range(len(cities)), [f"{_short(c)} (n={len(by_city[c])})" for c in cities])
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            text = "–" if v is None else f"{v:.1f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if v is None or v < 6 else "black")
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label="mean score")
    ax.set_title(title)
    return _png(fig)


def _short(text: str, limit: int = 32) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _mean(values) -> float | None:
    xs = _finite(values)
    return sum(xs) / len(xs) if xs else None


def similarity_plots(hits: list[dict]) -> bytes:
    """Left: similarity histogram per query mode. Right: similarity by rank (box plot)."""
    sims = _finite(h.get("similarity") for h in hits)
    if not sims:
        return _empty("similarity of retrieved images")
    fig = Figure(figsize=(10, 3.4))
    left, right = fig.subplots(1, 2)
    modes = sorted({h.get("mode") or "?" for h in hits})
    lo, hi = min(sims), max(sims)
    bins = [lo + (hi - lo + 1e-9) * i / 20 for i in range(21)]
    for mode in modes:
        xs = _finite(h.get("similarity") for h in hits if (h.get("mode") or "?") == mode)
        left.hist(xs, bins=bins, alpha=0.6, label=f"{mode} (n={len(xs)})")
    left.set_xlabel("cosine similarity (query, image)")
    left.set_ylabel("hits")
    left.yaxis.set_major_locator(MaxNLocator(integer=True))
    left.legend(fontsize=8)
    left.set_title("similarity of retrieved images")
    ranks = sorted({h["rank"] for h in hits if isinstance(h.get("rank"), int)})[:20]
    data = [_finite(h.get("similarity") for h in hits if h.get("rank") == r) for r in ranks]
    ranks, data = [r for r, d in zip(ranks, data, strict=True) if d], [d for d in data if d]
    if data:
        right.boxplot(data, tick_labels=[str(r) for r in ranks])
    right.set_xlabel("rank")
    right.set_ylabel("similarity")
    right.set_title("similarity by rank")
    return _png(fig)


def city_counts(counts: list[tuple[str, int]], title: str, limit: int = 30) -> bytes:
    """Horizontal bars: rows per city, largest first."""
    counts = counts[:limit]
    if not counts:
        return _empty(title)
    fig = Figure(figsize=(7, 0.28 * len(counts) + 1.2))
    ax = fig.add_subplot()
    names = [_short(c) if c else "(no city)" for c, _ in counts][::-1]
    ax.barh(names, [n for _, n in counts][::-1], color="#4477aa")
    ax.set_xlabel("images")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.tick_params(axis="y", labelsize=8)
    return _png(fig)


def score_histograms(columns: dict[str, list[float | None]], title: str) -> bytes:
    """One histogram per perception score (2×3), with n and mean in each panel's title."""
    if not any(_finite(v) for v in columns.values()):
        return _empty(title)
    fig = Figure(figsize=(10, 5))
    axes = fig.subplots(2, 3).ravel()
    for ax, name in zip(axes, SCORE_COLUMNS, strict=True):
        xs = _finite(columns.get(name, []))
        if xs:
            ax.hist(xs, bins=20, color="#228833")
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(f"{name.replace('_', ' ')} (n={len(xs)}, mean {sum(xs) / len(xs):.2f})",
                         fontsize=9)
        else:
            ax.set_title(f"{name.replace('_', ' ')} (no values)", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return _png(fig)
