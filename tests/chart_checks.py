"""What a reader of a saved chart sees, measured on the matplotlib objects instead of by eye:
text too small to read, tick labels running into each other, text covering text.

Shared by the chart tests (tests/ is on sys.path: ``from chart_checks import ...``)."""

from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Text

MIN_FONT_PT = 7.0  # the smallest text a chart may hold at its saved size


def draw(fig: Figure):
    """Lay the figure out as `report._save` does (Agg at 120 dpi) and return the renderer."""
    FigureCanvasAgg(fig)
    fig.set_dpi(120)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def visible_texts(fig: Figure) -> list[Text]:
    """Every non-empty, visible text of the figure: titles, labels, tick labels, legends,
    cell numbers."""
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def too_small(fig: Figure, min_pt: float = MIN_FONT_PT) -> list[tuple[str, float]]:
    return [(t.get_text(), t.get_fontsize()) for t in visible_texts(fig)
            if t.get_fontsize() < min_pt]


def overlapping_tick_labels(fig: Figure) -> list[tuple[str, str, str]]:
    """(axis, label, label) for each pair of drawn tick labels of one axis whose boxes overlap,
    over every axes of the figure (colorbars included). Only ticks inside the view limits are
    drawn, so only those count."""
    renderer = draw(fig)
    bad = []
    for ax in fig.axes:
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            lo, hi = sorted(axis.get_view_interval())
            ticks = [*axis.get_major_ticks(), *axis.get_minor_ticks()]
            labels = [t.label1 for t in ticks
                      if t.label1.get_visible() and t.label1.get_text()
                      and lo - 1e-12 * abs(lo) <= t.get_loc() <= hi + 1e-12 * abs(hi)]
            boxes = [lb.get_window_extent(renderer) for lb in labels]
            for i in range(len(boxes)):
                for j in range(i + 1, len(boxes)):
                    if boxes[i].overlaps(boxes[j]):
                        bad.append((f"{ax.get_title()[:30]!r}.{name}", labels[i].get_text(),
                                    labels[j].get_text()))
    return bad
