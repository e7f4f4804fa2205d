#!/usr/bin/env python3
"""A Modbus slave that is not edgegate's code: pymodbus (PyPI), serving a fixed register map
over RTU on a serial device (a pseudo-terminal in the tests) or over TCP on 127.0.0.1.

Used by tests/modbus.rs and bench/modbus-poll.sh. The values are encoded by pymodbus's own
`convert_to_registers` (big-endian words, "little" word order for the word swap); the byte swap
of the BADC/DCBA orders is applied here per register, since pymodbus has no byte-swap option.

Units (the map is the same over RTU and TCP):
  1 "types":  every type in every byte/word order (holding registers, see TYPES), coils 0-2,
              discrete input 0, input registers 0-2 (raw values the tests scale)
  2 "meter":  holding register 0 (a writable i16 set point, raw 215), coil 0 (a writable relay,
              off), input register 0 (raw 2301); only 10 registers: address 150 is exception 2
  3 "spare":  holding register 0 = 7 (the relay mutes it to make a dead slave)
  10..10+N-1  with --bench N: 10 input registers each (the benchmark's 32 x 10 points)
--mute U: unit U's answers are not sent (a slave that does not answer, for TCP, where there is
no relay to drop them). pymodbus answers unknown units with exception 4 over a SimDevice list.

Prints "ready" on stdout once serving.
"""

import argparse
import asyncio
import sys

from pymodbus.client.mixin import ModbusClientMixin as M
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

ORDERS = ["ABCD", "CDAB", "BADC", "DCBA"]
# (name, pymodbus type, value, offset within an order's group of 30 registers)
TYPES = [
    ("u32", M.DATATYPE.UINT32, 3_000_000_000, 0),
    ("i32", M.DATATYPE.INT32, -123_456_789, 2),
    ("f32", M.DATATYPE.FLOAT32, 230.1, 4),
    ("u64", M.DATATYPE.UINT64, 12_345_678_901_234_567_890, 6),
    ("i64", M.DATATYPE.INT64, -1_234_567_890_123, 10),
    ("f64", M.DATATYPE.FLOAT64, -0.000123, 14),
    ("i16", M.DATATYPE.INT16, -2, 18),
    ("string", M.DATATYPE.STRING, "AB12c", 19),
]
STRING_REGS = 3


def encode(value, dtype, order):
    word = "little" if order in ("CDAB", "DCBA") and dtype != M.DATATYPE.STRING else "big"
    regs = M.convert_to_registers(value, dtype, word_order=word)
    if dtype == M.DATATYPE.STRING:
        regs = (regs + [0] * STRING_REGS)[:STRING_REGS]
    if order in ("BADC", "DCBA"):
        regs = [((r & 0xFF) << 8) | (r >> 8) for r in regs]
    return regs


def types_holding():
    hr = [0] * 130
    hr[0] = 54321
    hr[1] = M.convert_to_registers(-1234, M.DATATYPE.INT16)[0]
    for k, order in enumerate(ORDERS):
        base = 10 + 30 * k
        for _name, dtype, value, off in TYPES:
            for i, r in enumerate(encode(value, dtype, order)):
                hr[base + off + i] = r
    return hr


def regs(values):
    return [SimData(0, values=values, datatype=DataType.REGISTERS)]


def bits(values):
    return [SimData(0, values=values, datatype=DataType.BITS)]


def devices(bench):
    i16 = lambda v: M.convert_to_registers(v, M.DATATYPE.INT16)[0]  # noqa: E731
    out = [
        SimDevice(
            1,
            simdata=(
                bits([True, False, True]),
                bits([True]),
                regs(types_holding()),
                regs([2301, i16(-405), 1234]),
            ),
        ),
        SimDevice(
            2,
            simdata=(bits([False]), bits([False]), regs([215] + [0] * 9), regs([2301])),
        ),
        SimDevice(3, simdata=(bits([False]), bits([False]), regs([7]), regs([7]))),
    ]
    for n in range(bench):
        out.append(
            SimDevice(
                10 + n,
                simdata=(
                    bits([False]),
                    bits([False]),
                    regs([0]),
                    regs([100 * n + i for i in range(10)]),
                ),
            )
        )
    return out


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rtu", help="serial device to serve RTU on")
    ap.add_argument("--baud", type=int, default=19200)
    # Linux pseudo-terminals refuse parity bits (tcsetattr: EINVAL): the tests use none.
    ap.add_argument("--parity", default="N", choices=["N", "E", "O"])
    ap.add_argument("--tcp", type=int, help="TCP port on 127.0.0.1")
    ap.add_argument("--bench", type=int, default=0, help="add N benchmark slaves (units 10..)")
    ap.add_argument("--mute", type=int, action="append", default=[])
    a = ap.parse_args()
    devs = devices(a.bench)
    unit_at = 0 if a.rtu else 6  # RTU: first byte; TCP: after the 6-byte MBAP prefix

    def trace(sending, packet):
        if sending and len(packet) > unit_at and packet[unit_at] in a.mute:
            return b""
        return packet
    if a.rtu:
        server = ModbusSerialServer(
            devs, port=a.rtu, baudrate=a.baud, parity=a.parity, ignore_missing_devices=True,
            trace_packet=trace,
        )
    elif a.tcp:
        server = ModbusTcpServer(
            devs, address=("127.0.0.1", a.tcp), ignore_missing_devices=True, trace_packet=trace
        )
    else:
        ap.error("--rtu or --tcp")
    await server.serve_forever(background=True)
    print("ready", flush=True)
    await server.serving


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
