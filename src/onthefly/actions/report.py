"""A session as one self-contained HTML file, to keep or send: what ran, its curves, the
per-sample evidence, slices, clusterings, tests, checkpoints and the event log.

Self-contained means no network at all: the CSS is inline, the charts are inline SVG drawn here
(no plotting library, no script), and the page's Content-Security-Policy forbids it to load
anything. Every string read from the session is escaped: run and slice names are user text.
The file is written under a temporary name in the target folder and renamed when complete, so
a reader never sees half a report.
"""

from __future__ import annotations

import html
import json
import math
import os
import secrets
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import StoreError
from ..store.reader import SessionReader

__all__ = ["write_report"]

CURVE_POINTS = 1000  # per curve, downsampled in SQLite (bucket means)
TOP_SAMPLES = 20
EVENTS_HEAD, EVENTS_TAIL = 100, 400  # a longer log shows its start and its end
SUMMARY_CHARS = 200  # of an event's payload, a slice's definition
HISTOGRAM_BINS = 50
MARKED_QUANTILES = ("p50", "p90", "p99")
# Chart title -> the metrics drawn on it, when the run recorded them.
CURVES = (("loss", ("train_loss", "val_loss")), ("accuracy", ("val_accuracy",)), ("learning rate", ("lr",)))
SAMPLE_COLUMNS = (("index", "index"), ("label", "label"), ("pred", "pred"), ("loss", "loss"),
                  ("margin", "margin"), ("AUM", "aum"), ("forgetting", "forgetting"))
PALETTE = ("#2563eb", "#ea580c", "#16a34a", "#9333ea")

# Chart geometry (SVG user units): the plotting area sits inside these margins.
WIDTH, HEIGHT = 640, 260
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 30, 44

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #111827; margin: 0 auto;
       max-width: 1100px; padding: 16px 24px 48px; }
h1 { font-size: 22px; margin: 8px 0 4px; } h2 { font-size: 18px; margin: 32px 0 8px;
  border-bottom: 1px solid #e5e7eb; padding-bottom: 4px; } h3 { font-size: 15px; margin: 20px 0 6px; }
nav a { margin-right: 12px; color: #2563eb; text-decoration: none; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 8px 0; }
dt { color: #6b7280; } dd { margin: 0; }
table { border-collapse: collapse; margin: 6px 0 12px; font-size: 13px; }
th, td { border: 1px solid #e5e7eb; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f9fafb; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
td { max-width: 520px; overflow-wrap: anywhere; }
.none, .note { color: #6b7280; font-style: italic; }
svg.chart { display: block; margin: 8px 0; max-width: 100%; height: auto; }
svg text { font: 11px system-ui, sans-serif; fill: #374151; } svg .title { font-size: 13px; font-weight: 600; }
svg .grid { stroke: #e5e7eb; } svg .frame { fill: none; stroke: #9ca3af; }
svg .mark { stroke: #dc2626; stroke-dasharray: 4 3; } svg text.mark { fill: #dc2626; stroke: none; }
ul.lineage, ul.lineage ul { list-style: none; padding-left: 18px; margin: 2px 0; }
ul.lineage li::before { content: "└ "; color: #9ca3af; }
"""


def write_report(session: SessionReader, out: str | Path) -> Path:
    """Write ``session``'s report to ``out`` (an .html file, replaced if it exists) and return
    its path. Works on a live session too: the report shows what was stored when it was made."""
    out = Path(out)
    page = _page(session)
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write the report to {out}: {exc}. Give a path in a folder that exists "
                         "and that you can write to.") from exc
    return out


def _page(reader: SessionReader) -> str:
    info, runs, events = reader.info(), reader.runs(), reader.events()
    sections = [
        ("runs", "Runs", _runs(runs, events)),
        ("curves", "Curves", _curves(reader, runs)),
        ("distribution", "Per-sample loss distribution", _distributions(reader, runs)),
        ("flagged", "Hard and likely mislabelled samples", _flagged(reader, runs)),
        ("slices", "Slices", _slices(reader)),
        ("clusterings", "Clusterings", _clusterings(reader)),
        ("plans", "Plan cards", _plans(reader)),
        ("lineage-edges", "Lineage", _edges(reader)),
        ("comparisons", "Comparisons", _comparisons(reader)),
        ("tests", "Tests", _tests(events)),
        ("checkpoints", "Checkpoints", _checkpoints(reader)),
        ("events", "Event log", _events(events)),
    ]
    nav = "".join(f'<a href="#{key}">{title}</a>' for key, title, _ in sections)
    body = "".join(f'<section id="{key}"><h2>{title}</h2>{content}</section>' for key, title, content in sections)
    project = _esc(info.get("project", "?"))
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        # Nothing may be fetched: no scripts, fonts or images, only the inline style.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f'<meta name="generator" content="onthefly {__version__}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>On The Fly report: {project} {_esc(info.get('id', ''))}</title><style>{_CSS}</style></head>"
        f'<body><header id="summary"><h1>On The Fly report: {project}</h1>{_summary(info)}</header>'
        f"<nav>{nav}</nav>{body}</body></html>\n"
    )


# ---- sections -------------------------------------------------------------------------------
def _summary(info: dict[str, Any]) -> str:
    if not info:
        return _none("the session database has no session row")
    created, ended = info.get("created"), info.get("ended")
    fields = [("session", info.get("id")), ("created", _time(created)), ("ended", _time(ended)),
              ("duration", _duration(created, ended)), ("status", info.get("status")),
              ("On The Fly version", info.get("version")), ("host", info.get("host")),
              ("report written", _time(time.time()))]
    if info.get("error"):
        fields.append(("error", info["error"]))
    return "<dl>" + "".join(f"<dt>{name}</dt><dd>{_esc(value)}</dd>" for name, value in fields) + "</dl>"


def _runs(runs: list[dict[str, Any]], events: list[dict[str, Any]]) -> str:
    steps: dict[int, int] = {}  # the highest step any event of the run was recorded at
    for event in events:
        if event["run_id"] is not None and event["step"] is not None:
            steps[event["run_id"]] = max(steps.get(event["run_id"], 0), event["step"])
    table = _table(["id", "name", "status", "parent", "steps", "created", "duration"], [
        [run["id"], run["name"], run["status"], _parent(run), steps.get(run["id"], 0), _time(run["created"]),
         _duration(run["created"], run["ended"])] for run in runs])
    return table + (f"<h3>Lineage</h3>{_lineage(runs)}" if len(runs) > 1 else "")


def _parent(run: dict[str, Any]) -> str | None:
    if run["parent_id"] is None:
        return None
    at = "" if run["parent_checkpoint_id"] is None else f" at checkpoint {run['parent_checkpoint_id']}"
    return f"forked from run {run['parent_id']}{at}"


def _lineage(runs: list[dict[str, Any]]) -> str:
    """Runs as a nested list under the runs they were forked from (a run whose parent is not
    in the session is a root)."""
    ids = {run["id"] for run in runs}
    children: dict[int | None, list[dict[str, Any]]] = {}
    for run in runs:
        children.setdefault(run["parent_id"] if run["parent_id"] in ids else None, []).append(run)

    def items(parent: int | None) -> str:
        listed = []
        for run in children.get(parent, []):
            at = "" if run["parent_checkpoint_id"] is None else f" (from checkpoint {run['parent_checkpoint_id']})"
            below = items(run["id"])
            listed.append(f"<li>{_run_title(run)}{at}{f'<ul>{below}</ul>' if below else ''}</li>")
        return "".join(listed)

    return f'<ul class="lineage">{items(None)}</ul>'


def _curves(reader: SessionReader, runs: list[dict[str, Any]]) -> str:
    if not runs:
        return _none("no runs")
    parts = []
    for run in runs:
        recorded = set(reader.metric_names(run["id"]))
        charted = []
        for title, metrics in CURVES:
            series = []
            for name in (m for m in metrics if m in recorded):
                values = reader.metric_series(run["id"], name, points=CURVE_POINTS)
                series.append((name, values["step"], values["value"]))
            if series:
                charted.append((title, series))
        steps = [step for _, series in charted for _, xs, _ in series for step in xs]
        span = (min(steps), max(steps)) if steps else None  # one step axis for all of a run's charts
        charts = [_svg_lines(title, series, x_label="step", y_label=title, x_range=span,
                             testid=f"curve-{run['id']}-{title.replace(' ', '-')}") for title, series in charted]
        parts.append(f"<h3>{_run_title(run)}</h3>" + ("".join(charts) or _none("no curves recorded")))
    return "".join(parts)


def _distributions(reader: SessionReader, runs: list[dict[str, Any]]) -> str:
    if not runs:
        return _none("no runs")
    parts = []
    for run in runs:
        parts.append(f"<h3>{_run_title(run)}</h3>")
        epoch = reader.default_epoch(run["id"])
        if epoch is None:
            parts.append(_none("no per-sample values"))
            continue
        dist = reader.loss_distribution(run["id"], epoch, bins=HISTOGRAM_BINS)
        if not dist["counts"]:
            parts.append(_none(f"no finite per-sample loss at epoch {epoch}"))
            continue
        quantiles = dist["quantiles"] or {}
        marks = {name: quantiles[name] for name in MARKED_QUANTILES if quantiles.get(name) is not None}
        parts.append(f'<p>{_epoch_note(reader, run["id"], epoch)}: {_esc(dist["count"])} samples, mean loss '
                     f'{_esc(dist["mean"])}, median {_esc(dist["median"])}, MAD {_esc(dist["mad"])}</p>')
        parts.append(_svg_histogram(f"per-sample loss, epoch {epoch}", dist["edges"], dist["counts"], marks,
                                    x_label="loss", testid=f"distribution-{run['id']}"))
    return "".join(parts)


def _flagged(reader: SessionReader, runs: list[dict[str, Any]]) -> str:
    if not runs:
        return _none("no runs")
    headers = [title for title, _ in SAMPLE_COLUMNS]
    parts = []
    for run in runs:
        parts.append(f"<h3>{_run_title(run)}</h3>")
        epoch, table = reader.sample_stats_at(run["id"])
        if epoch is None or table.num_rows == 0:
            parts.append(_none("no per-sample values"))
            continue
        for flag, key, order, what in (("hard", "loss", "descending", "highest loss"),
                                       ("mislabelled", "aum", "ascending", "lowest AUM")):
            flagged = table.filter(table.column(flag))
            top = flagged.sort_by([(key, order)]).slice(0, TOP_SAMPLES).to_pylist()
            label = "Hard" if flag == "hard" else "Likely mislabelled"
            parts.append(f"<h4>{label}: {flagged.num_rows} of {table.num_rows} samples at "
                         f"{_epoch_note(reader, run['id'], epoch)}"
                         f"{f', the {len(top)} with the {what}' if top else ''}</h4>")
            parts.append(_table(headers, [[row[column] for _, column in SAMPLE_COLUMNS] for row in top]))
    return "".join(parts)


def _slices(reader: SessionReader) -> str:
    return _table(["name", "definition", "count", "run", "epoch", "split"], [
        [s["name"], _clip(json.dumps(s["definition"], sort_keys=True)), s["count"], s["run_id"], s["epoch"],
         s["split"]] for s in reader.slices()])


def _clusterings(reader: SessionReader) -> str:
    return _table(["id", "run", "epoch", "k", "features", "subset", "silhouette"], [
        [c["id"], c["run_id"], c["epoch"], c["k"], c["features"], c["details"].get("subset"), c["silhouette"]]
        for c in reader.clusterings()])


def _plans(reader: SessionReader) -> str:
    def outcome(plan: dict[str, Any]) -> str | None:
        verdict = (plan["result"] or {}).get("verdict") or {}
        if plan["error"]:
            return f"failed: {plan['error']}"
        if verdict.get("met") is None:
            return None if not verdict else "scheduled" if "scheduled_from_step" in verdict else "no verdict"
        gain = verdict.get("slice_gain_pt")
        return f"{'met' if verdict['met'] else 'not met'} (slice {gain:+.1f} pt)" if gain is not None else \
            ("met" if verdict["met"] else "not met")

    return _table(["id", "kind", "status", "source", "card", "runs", "outcome"], [
        [p["id"], p["kind"], p["status"], p["source"], _clip(json.dumps(p["card"], sort_keys=True)),
         ", ".join(map(str, p["runs"] or [])) or None, outcome(p)] for p in reader.plans()])


def _edges(reader: SessionReader) -> str:
    names = {r["id"]: r["name"] for r in reader.runs()}
    return _table(["child", "parent", "kind", "step", "checkpoint", "plan card"], [
        [f"{e['child']} {names.get(e['child'], '')}", f"{e['parent']} {names.get(e['parent'], '')}", e["kind"],
         e["step"], e["checkpoint_id"], e["plan_id"]] for e in reader.lineage()["edges"]])


def _comparisons(reader: SessionReader) -> str:
    rows = []
    for comparison in reader.comparisons():
        result = comparison["result"]
        for cell in result.get("cells", []):
            accuracy = ((cell.get("diff") or {}).get("accuracy")) if cell.get("diff") else None
            interval = None if accuracy is None or accuracy.get("low") is None else \
                f"{accuracy['value'] * 100:+.1f} pt [{accuracy['low'] * 100:+.1f}, {accuracy['high'] * 100:+.1f}]"
            rows.append([comparison["id"], cell["run"], cell["set"], cell["n"], cell.get("accuracy"),
                         "reference" if cell["run"] == result.get("reference") else interval
                         or (cell.get("diff") or {}).get("interval_note"),
                         (cell.get("mcnemar") or {}).get("p")])
    return _table(["comparison", "run", "set", "n", "accuracy", "difference vs reference", "McNemar p"], rows)


def _tests(events: list[dict[str, Any]]) -> str:
    tests = [e for e in events if e["kind"] == "eval" and e["payload"].get("split") == "test"]
    return _table(["run", "step", "epoch", "loss", "accuracy", "samples", "checkpoint"], [
        [e["run_id"], e["step"], e["epoch"], e["payload"].get("loss"), e["payload"].get("accuracy"),
         e["payload"].get("samples"), _tested_checkpoint(e["payload"])] for e in tests])


def _tested_checkpoint(payload: dict[str, Any]) -> Any:
    if payload.get("checkpoint_id") is not None:
        return payload["checkpoint_id"]
    if payload.get("checkpoint_error"):
        return f"not saved: {payload['checkpoint_error']}"
    return None


def _checkpoints(reader: SessionReader) -> str:
    return _table(["id", "run", "step", "epoch", "reason", "size", "time"], [
        [c["id"], c["run_id"], c["step"], c["epoch"], c["reason"], _size(c["bytes"]), _time(c["time"])]
        for c in reader.checkpoints()])


def _events(events: list[dict[str, Any]]) -> str:
    headers = ["seq", "time", "run", "step", "kind", "payload"]

    def rows(chosen: list[dict[str, Any]]) -> list[list[Any]]:
        return [[e["seq"], _time(e["time"]), e["run_id"], e["step"], e["kind"],
                 _clip(json.dumps(e["payload"], default=str))] for e in chosen]

    if len(events) <= EVENTS_HEAD + EVENTS_TAIL:
        return _table(headers, rows(events))
    left_out = len(events) - EVENTS_HEAD - EVENTS_TAIL
    return (_table(headers, rows(events[:EVENTS_HEAD]))
            + f'<p class="note">{len(events)} events: {left_out} left out here, between the first '
              f"{EVENTS_HEAD} and the last {EVENTS_TAIL}.</p>"
            + _table(headers, rows(events[-EVENTS_TAIL:])))


# ---- charts ---------------------------------------------------------------------------------
class _Plot:
    """Data to SVG coordinates for one chart, over round-numbered axes that hold every value."""

    def __init__(self, x_range: tuple[float, float], y_range: tuple[float, float]) -> None:
        self.x_ticks, self.y_ticks = _ticks(*x_range), _ticks(*y_range)
        self.x0, self.x1 = self.x_ticks[0], self.x_ticks[-1]
        self.y0, self.y1 = self.y_ticks[0], self.y_ticks[-1]

    def x(self, value: float) -> float:
        return LEFT + (value - self.x0) / (self.x1 - self.x0) * (WIDTH - LEFT - RIGHT)

    def y(self, value: float) -> float:
        return HEIGHT - BOTTOM - (value - self.y0) / (self.y1 - self.y0) * (HEIGHT - TOP - BOTTOM)

    def axes(self, title: str, x_label: str, y_label: str) -> list[str]:
        bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
        parts = [f'<text class="title" x="{LEFT}" y="{TOP - 12}">{html.escape(title)}</text>']
        for t in self.y_ticks:
            y = self.y(t)
            parts.append(f'<line class="grid" x1="{LEFT}" x2="{right}" y1="{y:.1f}" y2="{y:.1f}"/>'
                         f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_tick(t)}</text>')
        for t in self.x_ticks:
            x = self.x(t)
            parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{bottom}" y2="{bottom + 4}"/>'
                         f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle">{_tick(t)}</text>')
        parts.append(f'<rect class="frame" x="{LEFT}" y="{TOP}" width="{right - LEFT}" height="{bottom - TOP}"/>'
                     f'<text x="{(LEFT + right) / 2:.0f}" y="{HEIGHT - 6}" text-anchor="middle">'
                     f"{html.escape(x_label)}</text>"
                     f'<text transform="translate(14 {(TOP + bottom) / 2:.0f}) rotate(-90)" text-anchor="middle">'
                     f"{html.escape(y_label)}</text>")
        return parts


def _svg_lines(title: str, series: Sequence[tuple[str, Sequence[int], Sequence[float | None]]], *,
               x_label: str, y_label: str, testid: str, x_range: tuple[float, float] | None = None) -> str:
    """A line chart of (name, steps, values) series; non-finite values are gaps in the lines.
    ``x_range``: the steps the x axis spans at least (default: those of the finite values)."""
    points = [(x, y) for _, xs, ys in series for x, y in zip(xs, ys, strict=True) if y is not None and math.isfinite(y)]
    if not points:
        return _none(f"{title}: no finite values")
    xs_seen = [p[0] for p in points] + (list(x_range) if x_range else [])
    plot = _Plot((min(xs_seen), max(xs_seen)), (min(p[1] for p in points), max(p[1] for p in points)))
    parts = plot.axes(title, x_label, y_label)
    for i, (name, xs, ys) in enumerate(series):
        moves, pen_down = [], False
        for x, y in zip(xs, ys, strict=True):
            if y is None or not math.isfinite(y):
                pen_down = False
                continue
            # A new stretch starts with a zero-length segment: round caps draw a lone point as a dot.
            moves.append(f"L{plot.x(x):.1f},{plot.y(y):.1f}" if pen_down else f"M{plot.x(x):.1f},{plot.y(y):.1f}l0,0")
            pen_down = True
        parts.append(f'<path d="{" ".join(moves)}" fill="none" stroke="{PALETTE[i % len(PALETTE)]}" '
                     f'stroke-width="1.5" stroke-linecap="round" stroke-linejoin="round" '
                     f'data-series="{html.escape(name)}"/>')
    parts.extend(_legend([name for name, _, _ in series]))
    return _svg(title, testid, parts, points=len(points))


def _legend(names: Sequence[str]) -> list[str]:
    """A colour swatch and name per series, in order, ending at the chart's top right corner."""
    widths = [6.5 * len(name) + 34 for name in names]  # 6.5: about the width of a letter of 11 px text
    x = WIDTH - RIGHT - sum(widths)
    parts = []
    for i, (name, width) in enumerate(zip(names, widths, strict=True)):
        parts.append(f'<line x1="{x + 12:.0f}" x2="{x + 28:.0f}" y1="{TOP - 16}" y2="{TOP - 16}" '
                     f'stroke="{PALETTE[i % len(PALETTE)]}" stroke-width="2"/>'
                     f'<text x="{x + 32:.0f}" y="{TOP - 12}">{html.escape(name)}</text>')
        x += width
    return parts


def _svg_histogram(title: str, edges: Sequence[float], counts: Sequence[int], marks: dict[str, float], *,
                   x_label: str, testid: str) -> str:
    """Bars of ``counts`` between ``edges``, with dashed lines at ``marks`` (name -> value)."""
    plot = _Plot((edges[0], edges[-1]), (0, max(counts)))
    parts = plot.axes(title, x_label, "samples")
    for low, high, count in zip(edges[:-1], edges[1:], counts, strict=True):
        x, top = plot.x(low), plot.y(count)
        parts.append(f'<rect x="{x:.1f}" y="{top:.1f}" width="{max(plot.x(high) - x - 0.5, 0.5):.1f}" '
                     f'height="{plot.y(0) - top:.1f}" fill="{PALETTE[0]}" fill-opacity="0.7">'
                     f"<title>{_tick(low)} to {_tick(high)}: {count} samples</title></rect>")
    for i, (name, value) in enumerate(marks.items()):
        x = plot.x(value)
        parts.append(f'<line class="mark" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{HEIGHT - BOTTOM}"/>'
                     f'<text class="mark" x="{x + 3:.1f}" y="{TOP + 12 + 12 * i}">{name} {_tick(value)}</text>')
    return _svg(title, testid, parts, points=len(counts))


def _svg(title: str, testid: str, parts: list[str], *, points: int) -> str:
    return (f'<svg class="chart" data-testid="{html.escape(testid)}" data-points="{points}" role="img" '
            f'aria-label="{html.escape(title)}" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}">'
            + "".join(parts) + "</svg>")


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round numbers (steps of 1, 2, 2.5 or 5 times a power of ten), from at or
    below ``low`` to at or above ``high``."""
    if not high > low:  # one value: a band around it
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    span = high - low
    if not math.isfinite(span):  # values near the float limits: no round numbers to find
        return [low, high]
    raw = span / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if raw <= m * magnitude * (1 + 1e-9))
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [i * step for i in range(first, last + 1)]


# ---- formatting -----------------------------------------------------------------------------
def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """An HTML table of ``rows``, every cell escaped; "none" when there are no rows."""
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{_esc(c)}</td>' if _is_number(c) else f"<td>{_esc(c)}</td>" for c in row)
        + "</tr>" for row in rows)
    if not body:
        return _none()
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _none(why: str = "") -> str:
    return f'<p class="none">none{f" ({html.escape(why)})" if why else ""}</p>'


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _esc(value: Any) -> str:
    if value is None:
        text = "—"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, float):
        text = f"{value:.4g}" if math.isfinite(value) else str(value)  # nan, inf, -inf
    else:
        text = str(value)
    return html.escape(text)


def _tick(value: float) -> str:
    if math.isfinite(value) and float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:.4g}"


def _clip(text: str) -> str:
    return text if len(text) <= SUMMARY_CHARS else text[:SUMMARY_CHARS - 1] + "…"


def _run_title(run: dict[str, Any]) -> str:
    return f"run {run['id']} · {html.escape(str(run['name']))}"


def _epoch_note(reader: SessionReader, run_id: int, epoch: int) -> str:
    complete = epoch in reader.complete_epochs(run_id)
    return f"epoch {epoch}" + ("" if complete else " (still being written when the report was made)")


def _time(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _duration(start: float | None, end: float | None) -> str | None:
    if start is None or end is None:
        return None
    seconds = max(end - start, 0.0)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s"


def _size(count: int) -> str:
    size, unit = float(count), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{count} B" if unit == "B" else f"{size:.1f} {unit}"
