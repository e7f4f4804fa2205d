#!/usr/bin/env python3
"""Median table from edgegate-loadgen JSON lines (label = "<edge>/<scenario>").

usage: tests/bench/loadgen-report.py loadgen.jsonl"""
import json
import statistics
import sys

KEYS = [
    ("e2e_msgs_s", "end-to-end msg/s"),
    ("ingest_msgs_s", "ingest (PUBACK) msg/s"),
    ("edge.cpu_us_per_msg", "edge CPU µs/msg"),
    ("edge.peak_rss_mib", "edge peak RSS MiB"),
    ("edge.write_bytes_per_msg", "edge bytes written/msg"),
    ("lat_ms_p50", "latency p50 ms"),
    ("lat_ms_p99", "latency p99 ms"),
    ("lost", "lost"),
    ("dups", "dups"),
    ("out_of_order", "out of order"),
]


def get(d, path):
    for part in path.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def main():
    runs = {}
    with open(sys.argv[1]) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                edge, _, scenario = r.get("label", "?/?").partition("/")
                runs.setdefault(scenario, {}).setdefault(edge, []).append(r)
    for scenario, by_edge in runs.items():
        edges = sorted(by_edge)
        print(f"\n#### {scenario} (median of {', '.join(f'{e}: {len(by_edge[e])}' for e in edges)} runs)\n")
        print("| figure | " + " | ".join(edges) + " |")
        print("|---|" + "---|" * len(edges))
        for key, label in KEYS:
            cells = []
            for e in edges:
                vals = [get(r, key) for r in by_edge[e]]
                vals = [v for v in vals if isinstance(v, (int, float))]
                if not vals:
                    cells.append("–")
                    continue
                m = statistics.median(vals)
                cells.append(f"{m:,.1f}" if isinstance(m, float) and not m.is_integer() else f"{int(m):,}")
            print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
