#!/usr/bin/env python3
"""One snapshot of a process from /proc, as one JSON line (used by idle.sh and backlog-growth.sh).

usage: proc_sample.py PID [DATADIR]

Fields: cpu_ticks (utime+stime of all threads, USER_HZ ticks), ctxt_voluntary / ctxt_nonvoluntary
(summed over /proc/PID/task/*: a thread that exits takes its count with it, so compare thread
counts too), threads, rss_kib, hwm_kib, write_bytes (/proc/PID/io), sys_busy / sys_total (the
machine's /proc/stat ticks, for the outside load), t (monotonic seconds) and, with DATADIR, the
apparent size of each regular file in it (files: {name: bytes}, disk_bytes: their sum).
Standard library only; a process that is gone prints {"gone": true} and exits 1.
"""
import json
import os
import sys
import time


def status_fields(path):
    out = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.split()
    return out


def main():
    pid = int(sys.argv[1])
    datadir = sys.argv[2] if len(sys.argv) > 2 else None
    snap = {"pid": pid, "t": time.monotonic()}
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name may hold spaces and parentheses: split after the last ')'.
            rest = f.read().rsplit(")", 1)[1].split()
        snap["cpu_ticks"] = int(rest[11]) + int(rest[12])
        st = status_fields(f"/proc/{pid}/status")
        snap["threads"] = int(st["Threads"][0])
        snap["rss_kib"] = int(st["VmRSS"][0])
        snap["hwm_kib"] = int(st["VmHWM"][0])
        vol = nonvol = 0
        tasks = os.listdir(f"/proc/{pid}/task")
        for tid in tasks:
            try:
                ts = status_fields(f"/proc/{pid}/task/{tid}/status")
            except OSError:
                continue  # the thread ended between listing and reading
            vol += int(ts["voluntary_ctxt_switches"][0])
            nonvol += int(ts["nonvoluntary_ctxt_switches"][0])
        snap["ctxt_voluntary"] = vol
        snap["ctxt_nonvoluntary"] = nonvol
        snap["tasks_read"] = len(tasks)
        with open(f"/proc/{pid}/io") as f:
            io = {k: v for k, _, v in (line.partition(":") for line in f)}
        snap["write_bytes"] = int(io["write_bytes"])
    except (OSError, KeyError, IndexError, ValueError):
        print(json.dumps({"pid": pid, "gone": True}))
        return 1
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    snap["sys_busy"] = sum(v) - v[3] - v[4]  # everything but idle and iowait
    snap["sys_total"] = sum(v)
    if datadir is not None:
        files = {}
        if os.path.isdir(datadir):
            for name in sorted(os.listdir(datadir)):
                p = os.path.join(datadir, name)
                try:
                    if os.path.isfile(p):
                        files[name] = os.stat(p).st_size
                except OSError:
                    pass  # removed while listing (e.g. a temporary file)
        snap["files"] = files
        snap["disk_bytes"] = sum(files.values())
    print(json.dumps(snap))
    return 0


if __name__ == "__main__":
    sys.exit(main())
