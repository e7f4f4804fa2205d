#!/usr/bin/env python3
"""The RS-485 cable between two pseudo-terminal pairs, with faults injected on request.

    gateway ── pair A ── [this relay] ── pair B ── pymodbus slave

Requests (gateway → slave) pass unchanged as they arrive. Answers (slave → gateway) are
collected until the slave side has been quiet for 3 ms (a pseudo-terminal has no baud timing;
pymodbus writes each answer at once), then forwarded, dropped or corrupted according to the
control file, read before each answer. Its lines:

    mute <unit>      answers from that unit are dropped (a slave that stopped answering)
    corrupt <unit>   the last CRC byte of that unit's answers is flipped

Prints "ready" on stdout once both ends are open, and one line per answer it touched.
"""

import argparse
import os
import select
import sys
import termios
import time
import tty

QUIET = 0.003


def open_raw(path):
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    tty.setraw(fd)
    attrs = termios.tcgetattr(fd)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, attrs)
    return fd


def rules(path):
    out = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2 and parts[1].isdigit():
                    out[int(parts[1])] = parts[0]
    except FileNotFoundError:
        pass
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gateway", required=True, help="device end of the gateway's pair")
    ap.add_argument("--slave", required=True, help="port end of the slave's pair")
    ap.add_argument("--control", required=True)
    a = ap.parse_args()
    gw = open_raw(a.gateway)
    sl = open_raw(a.slave)
    print("ready", flush=True)
    answer = bytearray()
    last = 0.0
    while True:
        timeout = None if not answer else max(0.0, last + QUIET - time.monotonic())
        ready, _, _ = select.select([gw, sl], [], [], timeout)
        if gw in ready:
            data = os.read(gw, 4096)
            if not data:
                return
            os.write(sl, data)
        if sl in ready:
            data = os.read(sl, 4096)
            if not data:
                return
            answer += data
            last = time.monotonic()
            continue
        if answer and time.monotonic() - last >= QUIET:
            unit = answer[0]
            rule = rules(a.control).get(unit)
            if rule == "mute":
                print(f"muted {len(answer)} bytes from unit {unit}", flush=True)
            else:
                if rule == "corrupt":
                    answer[-1] ^= 0xFF
                    print(f"corrupted an answer from unit {unit}", flush=True)
                os.write(gw, bytes(answer))
            answer = bytearray()


if __name__ == "__main__":
    try:
        main()
    except (KeyboardInterrupt, OSError) as e:
        print(f"relay stopped: {e}", file=sys.stderr)
        sys.exit(0)
