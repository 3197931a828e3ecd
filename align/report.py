"""Static HTML reports with images, plots and tables (no JavaScript, no network).

A report is a list of :class:`Section` objects rendered into one self-contained folder:
``index.html`` next to the PNG/GIF files it references by relative path.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Figure:
    """An image file (relative to the report folder) with a caption."""

    path: str
    caption: str = ""
    width: int | None = None


@dataclass
class Section:
    """A titled block of text, figures and an optional table (list of row mappings)."""

    title: str
    text: str = ""
    figures: list[Figure] = field(default_factory=list)
    table: list[Mapping[str, object]] | None = None


def plot_lines(
    path: str | Path,
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    markers: bool = False,
    bands: Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """Line plot of ``{label: (xs, ys)}`` to a PNG (optional ± band per series)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o" if markers else None, ms=4, lw=1.6, label=label)
        if bands and label in bands:
            lo = [y - b for y, b in zip(ys, bands[label])]
            hi = [y + b for y, b in zip(ys, bands[label])]
            ax.fill_between(list(xs), lo, hi, alpha=0.2)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (NaNs skipped) for smoothing noisy training curves."""
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if not math.isnan(v)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#1d1d1f;background:#fafafa}
h1{font-size:1.7em;margin-bottom:.2em}h2{font-size:1.25em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.sub{color:#666;margin-top:0}.figs{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
figure{margin:0;background:#fff;border:1px solid #e3e3e3;border-radius:6px;padding:8px}
figure img{display:block;max-width:100%;image-rendering:pixelated}figcaption{font-size:.85em;color:#444;margin-top:4px;max-width:520px}
table{border-collapse:collapse;font-size:.9em;background:#fff}td,th{border:1px solid #ddd;padding:4px 9px;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}p{line-height:1.45}
.ok{color:#137333;font-weight:600}.bad{color:#b3261e;font-weight:600}
"""


def _cell(value: object) -> str:
    if isinstance(value, bool):
        return f'<span class="{"ok" if value else "bad"}">{"yes" if value else "no"}</span>'
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def write_html(path: str | Path, title: str, sections: Sequence[Section], subtitle: str = "") -> Path:
    """Render ``sections`` into ``path`` (an index.html beside its figures)."""
    path = Path(path)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if subtitle:
        parts.append(f"<p class='sub'>{html.escape(subtitle)}</p>")
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.text:
            parts += [f"<p>{html.escape(p)}</p>" for p in section.text.split("\n\n")]
        if section.figures:
            parts.append("<div class='figs'>")
            for fig in section.figures:
                width = f" width='{fig.width}'" if fig.width else ""
                parts.append(
                    f"<figure><img src='{html.escape(fig.path)}' alt='{html.escape(fig.caption)}'{width}>"
                    f"<figcaption>{html.escape(fig.caption)}</figcaption></figure>"
                )
            parts.append("</div>")
        if section.table:
            cols = list(section.table[0].keys())
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>")
            for row in section.table:
                parts.append("<tr>" + "".join(f"<td>{_cell(row.get(c, ''))}</td>" for c in cols) + "</tr>")
            parts.append("</table>")
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
