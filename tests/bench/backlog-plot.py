#!/usr/bin/env python3
"""SVG plot of backlog-growth.sh's CSVs, written by hand (standard library only, no matplotlib).

usage: backlog-plot.py OUT.svg EDGE.csv [EDGE.csv ...]

Two panels over the same x axis (messages queued = PUBACKed to the publisher so far): RSS in MiB,
and disk in MiB (solid: files in the data dir; dashed: bytes written, /proc/PID/io write_bytes).
One colour per edge, a legend, ticks on both axes.
"""
import csv
import html
import math
import sys

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
W, H = 980, 450
PANEL_W, PANEL_H = 380, 290
MARGIN_L, MARGIN_T = 80, 84
GAP = 110
MIB = 2**20


def nice_ticks(hi, count=5):
    """Round tick values from 0 to at least hi."""
    if hi <= 0:
        return [0, 1]
    raw = hi / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(math.ceil(hi / step - 1e-9)) + 1)]


def fmt(v):
    if v >= 1_000_000 and v % 1_000_000 == 0:
        return f"{v / 1_000_000:g}M"
    if v >= 1000 and v % 1000 == 0:
        return f"{v / 1000:g}k"
    return f"{v:g}"


def load(path):
    with open(path, newline="") as f:
        # A row without x (publisher stopped at the time limit mid-chunk) cannot be placed.
        rows = [r for r in csv.DictReader(f) if r.get("rss_kib") and r.get("x_acked")]
    if not rows:
        raise SystemExit(f"{path}: no samples")
    return {
        "label": rows[0]["edge"],
        "x": [int(r["x_acked"]) for r in rows],
        "rss": [int(r["rss_kib"]) / 1024 for r in rows],
        "disk": [int(r["disk_bytes"]) / MIB for r in rows],
        "written": [int(r["write_bytes"]) / MIB for r in rows],
    }


def panel(out, ox, title, ylabel, xmax, ymax, series):
    """series: (colour, dash, xs, ys). Draws axes, ticks, grid and polylines at offset ox."""
    xt, yt = nice_ticks(xmax), nice_ticks(ymax)
    xs_max, ys_max = xt[-1], yt[-1]

    def px(x):
        return ox + x / xs_max * PANEL_W

    def py(y):
        return MARGIN_T + PANEL_H - y / ys_max * PANEL_H

    out.append(f'<text x="{ox + PANEL_W / 2}" y="{MARGIN_T - 12}" text-anchor="middle" '
               f'font-weight="bold">{html.escape(title)}</text>')
    for v in yt:
        y = py(v)
        out.append(f'<line x1="{ox}" y1="{y:.1f}" x2="{ox + PANEL_W}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        out.append(f'<line x1="{ox - 5}" y1="{y:.1f}" x2="{ox}" y2="{y:.1f}" stroke="black"/>')
        out.append(f'<text x="{ox - 8}" y="{y + 4:.1f}" text-anchor="end">{fmt(v)}</text>')
    for v in xt:
        x = px(v)
        out.append(f'<line x1="{x:.1f}" y1="{MARGIN_T}" x2="{x:.1f}" y2="{MARGIN_T + PANEL_H}" stroke="#f0f0f0"/>')
        out.append(f'<line x1="{x:.1f}" y1="{MARGIN_T + PANEL_H}" x2="{x:.1f}" '
                   f'y2="{MARGIN_T + PANEL_H + 5}" stroke="black"/>')
        out.append(f'<text x="{x:.1f}" y="{MARGIN_T + PANEL_H + 19}" text-anchor="middle">{fmt(v)}</text>')
    out.append(f'<rect x="{ox}" y="{MARGIN_T}" width="{PANEL_W}" height="{PANEL_H}" fill="none" stroke="black"/>')
    out.append(f'<text x="{ox + PANEL_W / 2}" y="{MARGIN_T + PANEL_H + 40}" text-anchor="middle">'
               'messages queued (PUBACKed by the edge, upstream down)</text>')
    cy = MARGIN_T + PANEL_H / 2
    out.append(f'<text x="{ox - 55}" y="{cy}" text-anchor="middle" '
               f'transform="rotate(-90 {ox - 55} {cy})">{html.escape(ylabel)}</text>')
    for colour, dash, xs, ys in series:
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys))
        extra = ' stroke-dasharray="6 4"' if dash else ""
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"{extra}/>')
        for x, y in zip(xs, ys):
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{colour}"/>')


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    out_path, paths = sys.argv[1], sys.argv[2:]
    edges = [load(p) for p in paths]
    xmax = max(max(e["x"]) for e in edges)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">'
           'Backlog growth: RSS and disk vs queued QoS 1 messages (100 B), upstream down</text>']
    rss = [(COLOURS[i % len(COLOURS)], False, e["x"], e["rss"]) for i, e in enumerate(edges)]
    panel(out, MARGIN_L, "RSS", "RSS, MiB", xmax, max(max(e["rss"]) for e in edges), rss)
    disk = []
    for i, e in enumerate(edges):
        disk.append((COLOURS[i % len(COLOURS)], False, e["x"], e["disk"]))
        disk.append((COLOURS[i % len(COLOURS)], True, e["x"], e["written"]))
    dmax = max(max(max(e["disk"]), max(e["written"])) for e in edges)
    panel(out, MARGIN_L + PANEL_W + GAP, "Disk", "MiB", xmax, dmax, disk)
    # Legend: one line per edge, then the two line styles.
    lx, ly = MARGIN_L, 46
    for i, e in enumerate(edges):
        c = COLOURS[i % len(COLOURS)]
        reached = f" (reached {fmt(max(e['x']))})"
        out.append(f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 24}" y2="{ly - 4}" stroke="{c}" stroke-width="3"/>')
        out.append(f'<text x="{lx + 30}" y="{ly}">{html.escape(e["label"] + reached)}</text>')
        lx += 200
    lx = MARGIN_L + PANEL_W + GAP
    out.append(f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 24}" y2="{ly - 4}" stroke="black" stroke-width="2"/>')
    out.append(f'<text x="{lx + 30}" y="{ly}">files in the data dir</text>')
    out.append(f'<line x1="{lx + 170}" y1="{ly - 4}" x2="{lx + 194}" y2="{ly - 4}" stroke="black" '
               'stroke-width="2" stroke-dasharray="6 4"/>')
    out.append(f'<text x="{lx + 200}" y="{ly}">bytes written (/proc io)</text>')
    out.append(f'<text x="{MARGIN_L}" y="{H - 12}" fill="#555" font-size="11">x: messages PUBACKed to '
               'the publisher so far (each edge\'s own count is in its CSV). A line along 0 on the '
               'right: nothing on disk (queue in RAM).</text>')
    out.append("</svg>")
    with open(out_path, "w") as f:
        f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
