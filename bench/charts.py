"""Charts for the docs, drawn from the benchmarks' own result files.

    .venv/bin/python -m bench.charts        (bench/run charts; bench/run all ends with it)

Reads the Markdown tables the benchmarks write under ``bench/results/`` and
writes SVG bar charts to ``docs/images/``: the same numbers as the tables,
as a picture.  Plain SVG written here (no plotting library): the charts are
simple bars, and the docs build must not need anything more.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
IMAGES = ROOT / "docs" / "images"

_FAMILY = "font-family='-apple-system,Segoe UI,Helvetica,Arial,sans-serif'"
_FONT = f"{_FAMILY} font-size='12'"
_SIDECAR = "#2563eb"
_PEER = "#94a3b8"
_MARK = "#dc2626"


def tables(path: Path) -> list[list[dict[str, str]]]:
    """Every Markdown table in ``path``: a list of rows, each a header → cell mapping."""
    found: list[list[dict[str, str]]] = []
    header: list[str] | None = None
    rows: list[dict[str, str]] = []
    for line in [*path.read_text(encoding="utf-8").splitlines(), ""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif all(re.fullmatch(r":?-+:?", cell) for cell in cells):
                continue
            else:
                rows.append(dict(zip(header, cells, strict=False)))
        elif header is not None:
            found.append(rows)
            header, rows = None, []
    return found


def number(cell: str) -> float:
    """``"1,077"``, ``"98 %"``, ``"95.8%"`` → a float (the first number in the cell)."""
    match = re.search(r"-?[\d,]+(?:\.\d+)?", cell)
    if match is None:
        raise ValueError(f"no number in {cell!r}")
    return float(match.group(0).replace(",", ""))


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    sidecar: bool
    text: str | None = None  # shown at the bar's end; the value when None


@dataclass(frozen=True)
class Mark:
    """A dashed vertical line at ``value`` across the bars ``first`` to ``last`` (indexes), labelled."""

    value: float
    first: int
    last: int
    label: str


def bar_chart(
    title: str, unit: str, bars: Sequence[Bar], *, log: bool = False, note: str = "", marks: Sequence[Mark] = ()
) -> str:
    """A horizontal bar chart as an SVG document."""
    left, right, top, row = 240, 110, 44, 26
    width = 720
    plot = width - left - right
    height = top + row * len(bars) + (36 if note else 16)
    largest = max([bar.value for bar in bars] + [mark.value for mark in marks]) or 1.0
    smallest = min((bar.value for bar in bars if bar.value > 0), default=1.0)

    def scale(value: float) -> float:
        if value <= 0:
            return 0.0
        if not log:
            return plot * value / largest
        low = math.floor(math.log10(smallest))
        high = math.ceil(math.log10(largest))
        span = max(1, high - low)
        return plot * (math.log10(value) - low + 0.15) / (span + 0.15)

    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' role='img' aria-label='{_escape(title)}'>",
        f"<rect width='{width}' height='{height}' fill='white'/>",
        f"<text x='12' y='22' {_FAMILY} font-size='14' font-weight='600'>{_escape(title)}</text>",
        f"<text x='{width - 12}' y='22' {_FONT} text-anchor='end' fill='#475569'>{_escape(unit)}"
        f"{' (log scale)' if log else ''}</text>",
    ]
    for index, bar in enumerate(bars):
        y = top + index * row
        length = max(1.0, scale(bar.value))
        colour = _SIDECAR if bar.sidecar else _PEER
        text = bar.text if bar.text is not None else _format(bar.value)
        parts += [
            f"<text x='{left - 8}' y='{y + 15}' {_FONT} text-anchor='end'"
            f"{' font-weight=' + chr(39) + '600' + chr(39) if bar.sidecar else ''}>{_escape(bar.label)}</text>",
            f"<rect x='{left}' y='{y + 3}' width='{length:.1f}' height='{row - 8}' rx='3' fill='{colour}'/>",
            f"<text x='{left + length + 6:.1f}' y='{y + 15}' {_FONT} fill='#0f172a'>{_escape(text)}</text>",
        ]
    for mark in marks:
        x = left + scale(mark.value)
        y_top, y_bottom = top + mark.first * row, top + (mark.last + 1) * row - 4
        parts += [
            f"<line x1='{x:.1f}' y1='{y_top}' x2='{x:.1f}' y2='{y_bottom}' stroke='{_MARK}' stroke-width='1.5' "
            "stroke-dasharray='4 3'/>",
            f"<text x='{x + 4:.1f}' y='{y_top + 11}' {_FAMILY} font-size='10' fill='{_MARK}'>"
            f"{_escape(mark.label)}</text>",
        ]
    if note:
        parts.append(f"<text x='12' y='{height - 12}' {_FONT} fill='#64748b'>{_escape(note)}</text>")
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _format(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 or value == int(value) else f"{value:,.2f}"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&apos;")


# ---------------------------------------------------------------- the charts


def proxy_cpu(rows: Iterable[dict[str, str]]) -> str:
    """bench/results/latest.md: proxy CPU µs per 1 KiB GET, by proxy and concurrency."""
    order = ("nginx", "haproxy", "naive-aiohttp", "sidecar", "naive-httpx")
    bars = [
        Bar(f"{row['target']}  c={row['c']}", number(row["proxy CPU µs/req"]), row["target"] == "sidecar")
        for name in order
        for row in rows
        if row.get("scenario") == "GET 1 KiB" and row.get("target") == name and row.get("proxy CPU µs/req") != "-"
    ]
    return bar_chart(
        "Proxy CPU per request, 1 KiB GET (lower is better)",
        "µs per request",
        bars,
        log=True,
        note="bench/run: proxy pinned to one core, medians of 3 sweeps (bench/results/latest.md)",
    )


def proxy_cpu_targets(rows: Iterable[dict[str, str]]) -> str:
    """bench/results/latest.md: CPU µs per 1 KiB GET at c=50 and c=1000, and the target of 1.5x naive-aiohttp."""
    order = ("nginx", "haproxy", "naive-aiohttp", "sidecar")
    table = [row for row in rows if row.get("scenario") == "GET 1 KiB" and row.get("proxy CPU µs/req") != "-"]
    bars: list[Bar] = []
    marks: list[Mark] = []
    for concurrency in ("50", "1000"):
        group = [row for name in order for row in table if row["target"] == name and row["c"] == concurrency]
        if not group:
            continue
        first = len(bars)
        bars += [
            Bar(f"{row['target']}  c={concurrency}", number(row["proxy CPU µs/req"]), row["target"] == "sidecar")
            for row in group
        ]
        naive = next((row for row in group if row["target"] == "naive-aiohttp"), None)
        if naive is not None:
            target = 1.5 * number(naive["proxy CPU µs/req"])
            marks.append(Mark(target, first, len(bars) - 1, f"target: 1.5x naive-aiohttp = {target:,.0f}"))
    return bar_chart(
        "Proxy CPU per request against the target, 1 KiB GET (lower is better)",
        "µs per request",
        bars,
        marks=marks,
        note="bench/run: proxy pinned to one core (bench/results/latest.md); naive-httpx left out (off the scale)",
    )


def pacing(rows: Sequence[dict[str, str]]) -> str:
    """bench/results/pacing.md: the requests the upstream had to refuse."""
    bars = [
        Bar(row["proxy"], number(row["over-limit requests the upstream refused"]), row["proxy"].startswith("sidecar"))
        for row in rows
    ]
    goodput = ", ".join(f"{row['proxy']} {row['% of 50 req/s']}" for row in rows)
    return bar_chart(
        "Requests the upstream had to refuse (fewer is better)",
        "requests in 20 s",
        bars,
        log=True,
        note=f"bench/run pacing: 200 callers, an upstream enforcing 50 req/s; goodput: {goodput}",
    )


def fault_success(rows: Sequence[dict[str, str]]) -> str:
    """bench/results/faults.md (a): callers' success rate against a flaky upstream."""
    bars = [
        Bar(row["proxy"], number(row["success rate"]), row["proxy"].startswith("sidecar"), row["success rate"])
        for row in rows
    ]
    return bar_chart(
        "Success rate, upstream failing 20 % of requests (higher is better)",
        "% of caller requests",
        bars,
        note="bench/run faults: 50 callers, 20 s; the sidecar with retries under a 20 % budget",
    )


def fault_black_hole(rows: Sequence[dict[str, str]]) -> str:
    """bench/results/faults.md (b): p99 time to an answer from a black-hole upstream."""
    bars = [
        Bar(
            f"circuit breaker {row['circuit']}",
            number(row["p99 (ms)"]),
            row["circuit"] == "on",
            f"{row['p99 (ms)']} ms",
        )
        for row in rows
        if row["upstream"] == "black hole"
    ]
    return bar_chart(
        "p99 time to an answer, upstream that never answers (lower is better)",
        "ms",
        bars,
        log=True,
        note="bench/run faults: 50 callers, timeouts.read 2s; circuit_breaker failures: 5",
    )


def main() -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    written = []
    latest = tables(RESULTS / "latest.md")
    if latest:
        (IMAGES / "bench-proxy-cpu.svg").write_text(proxy_cpu(latest[0]), encoding="utf-8")
        (IMAGES / "bench-proxy-cpu-target.svg").write_text(proxy_cpu_targets(latest[0]), encoding="utf-8")
        written += ["bench-proxy-cpu.svg", "bench-proxy-cpu-target.svg"]
    pacing_tables = tables(RESULTS / "pacing.md")
    if pacing_tables:
        (IMAGES / "bench-pacing.svg").write_text(pacing(pacing_tables[0]), encoding="utf-8")
        written.append("bench-pacing.svg")
    fault_tables = tables(RESULTS / "faults.md")
    if len(fault_tables) >= 2:
        (IMAGES / "bench-faults-success.svg").write_text(fault_success(fault_tables[0]), encoding="utf-8")
        (IMAGES / "bench-faults-black-hole.svg").write_text(fault_black_hole(fault_tables[1]), encoding="utf-8")
        written += ["bench-faults-success.svg", "bench-faults-black-hole.svg"]
    print("charts:", ", ".join(f"docs/images/{name}" for name in written))


if __name__ == "__main__":
    main()
