#!/usr/bin/env python3
"""edgegate vs a peer, from the shared harness's JSON lines (same machine, same sitting).

usage: tests/bench/report.py EDGEGATE.jsonl PEER.jsonl
Prints a markdown table: median per figure, the ratio, the goal from the store-and-forward issue,
and whether it was met. Standard library only."""
import json
import statistics
import sys


def load(path):
    runs = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if r.get("ok"):
                runs.setdefault(r["scenario"], []).append(r)
    return runs


def med(runs, scenario, key):
    vals = [r["metrics"].get(key) for r in runs.get(scenario, [])]
    vals = [v for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return statistics.median(vals) if vals else None


def worst_ext(runs, scenario):
    vals = [r["contention"]["foreign_cpu_frac"] for r in runs.get(scenario, [])]
    return max(vals) if vals else None


def fmt(v, digits=1):
    if v is None:
        return "–"
    if isinstance(v, float) and not v.is_integer():
        return f"{v:,.{digits}f}"
    return f"{int(v):,}"


# (label, scenario, metric, goal kind, goal value): kinds: ratio_ge, ratio_le, abs_le, abs_eq
FIGURES = [
    ("end-to-end forward rate, msg/s", "a", "e2e_msgs_s", "ratio_ge", 1.5),
    ("edge CPU per forwarded message, µs", "a", "edge_cpu_us_per_msg", "ratio_le", 0.75),
    ("edge peak RSS, MiB", "a", "edge_peak_rss_mib", None, None),
    ("ingest (PUBACK) rate, msg/s", "a", "ingest_msgs_s", None, None),
    ("latency p50 / p99, ms", "a", ("lat_ms_p50", "lat_ms_p99"), None, None),
    ("drain rate after outage (incl. reconnect), msg/s", "b", "drain_msgs_s", "ratio_ge", 1.5),
    ("drain rate excluding reconnect, msg/s", "b", "drain_msgs_s_excl_reconnect", None, None),
    ("first arrival after upstream is back, s", "b", "first_arrival_after_up_s", None, None),
    ("RSS growth per queued message, B", "b", "rss_bytes_per_msg", "abs_le", 1),
    ("disk bytes per queued message (file size), B", "b", "disk_bytes_per_msg", "abs_le", 300),
    ("lost in outage and drain (of 200k)", "b", "lost", "abs_eq", 0),
    ("out of order after drain", "b", "out_of_order", "abs_eq", 0),
    ("c: kill -9 while buffering 100k: lost", "c-kill", "lost", "abs_eq", 0),
    ("c: SIGTERM while buffering 100k: lost", "c-term", "lost", "abs_eq", 0),
    ("c: duplicates after kill -9", "c-kill", "dups", None, None),
    ("d: flaky link, 60k at 2k/s: lost", "d", "lost", "abs_eq", 0),
    ("d: out of order", "d", "out_of_order", "abs_eq", 0),
    ("d: duplicates", "d", "dups", None, None),
    ("d: latency p50, ms", "d", "lat_ms_p50", None, None),
]


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    ours, peer = load(sys.argv[1]), load(sys.argv[2])
    print("| figure | edgegate | mosquitto bridge | ratio | goal | met |")
    print("|---|---|---|---|---|---|")
    for label, sc, key, kind, goal in FIGURES:
        if isinstance(key, tuple):
            o = " / ".join(fmt(med(ours, sc, k)) for k in key)
            p = " / ".join(fmt(med(peer, sc, k)) for k in key)
            print(f"| {label} | {o} | {p} | | | |")
            continue
        o, p = med(ours, sc, key), med(peer, sc, key)
        ratio = (o / p) if (o is not None and p not in (None, 0)) else None
        goal_s, met = "", ""
        if kind == "ratio_ge":
            goal_s, met = f"≥ {goal}× peer", ("yes" if ratio is not None and ratio >= goal else "**no**")
        elif kind == "ratio_le":
            goal_s, met = f"≤ {goal}× peer", ("yes" if ratio is not None and ratio <= goal else "**no**")
        elif kind == "abs_le":
            goal_s, met = f"≤ {goal}", ("yes" if o is not None and o <= goal else "**no**")
        elif kind == "abs_eq":
            goal_s, met = f"= {goal}", ("yes" if o is not None and o == goal else "**no**")
        print(f"| {label} | {fmt(o)} | {fmt(p)} | {fmt(ratio, 2) if ratio is not None else '–'} | {goal_s} | {met} |")
    print()
    for name, runs in (("edgegate", ours), ("mosquitto", peer)):
        counts = ", ".join(f"{sc} {len(v)}" for sc, v in sorted(runs.items()))
        worst = ", ".join(
            f"{sc} {worst_ext(runs, sc):.0%}" for sc in sorted(runs) if worst_ext(runs, sc) is not None
        )
        print(f"- {name}: runs per scenario: {counts}; worst outside CPU load: {worst}")


if __name__ == "__main__":
    main()
