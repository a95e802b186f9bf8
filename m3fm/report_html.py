"""Self-contained HTML reports: tables, and figures embedded as PNG (matplotlib, Agg backend), no files beside.

Shared by the site report (client/report.py) and the coordinator's run report
(server/report.py). Every text is escaped; a value that is a float prints with
three decimals, SUPPRESSED prints as it is.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;display:block;max-width:100%;overflow-x:auto}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}.suppressed{color:#999;font-style:italic}
figure{display:inline-block;margin:0 1em 1em 0}figcaption{font-size:90%;text-align:center}"""


def cell(value) -> str:
    if isinstance(value, float):
        return f"<td>{value:.3f}</td>"
    if value == "suppressed":
        return '<td class="suppressed">suppressed</td>'
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, float) for v in value):
        return f"<td>{value[0]:.3f}&ndash;{value[1]:.3f}</td>"
    return f"<td>{html.escape('' if value is None else str(value))}</td>"


def table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def png(fig) -> str:
    """A matplotlib figure as an inline <img>; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="figure" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def figure(img: str, caption: str) -> str:
    return f"<figure>{img}<figcaption>{html.escape(caption)}</figcaption></figure>"


def new_axes(width: float = 4.0, height: float = 4.0):
    import matplotlib

    matplotlib.use("Agg")  # no display at a hospital server or in CI
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def roc_png(title: str, curves: dict[str, dict]) -> str:
    """One ROC figure: a curve per label (a yes/no task has one; multi-class one per answer; risk one per year)."""
    fig, ax = new_axes()
    for label, c in curves.items():
        ax.plot(c["fpr"], c["tpr"], label=label or None, lw=1.5)
    ax.plot([0, 1], [0, 1], color="#aaa", lw=0.8, ls="--")
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01))
    if any(curves):
        ax.legend(fontsize=7, loc="lower right")
    return png(fig)


def write_text_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: a reader never sees half a report."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def page(title: str, sections: list[tuple[str, str]]) -> str:
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{content}\n" for h, content in sections)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n{body}</body></html>\n")
