#!/usr/bin/env python3
"""Interoperability checks with paho-mqtt (PyPI), a client nobody here wrote, through the front.

usage: paho_front.py PORT
Prints one line per check (PASS/FAIL name: detail) and exits with the number of failures.
Every wait is bounded (5 s); nothing is left running.
"""
import sys
import threading
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

HOST = "127.0.0.1"
PORT = int(sys.argv[1])
WAIT = 5.0


def cid(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Client:
    """A paho client with its network loop in a thread and the messages it received."""

    def __init__(self, client_id, v5=False, clean=True, keepalive=30, will=None):
        proto = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
        kwargs = {"client_id": client_id, "protocol": proto}
        if not v5:
            kwargs["clean_session"] = clean
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, **kwargs)
        self.v5 = v5
        self.clean = clean
        self.keepalive = keepalive
        self.msgs = []
        self.connack = None
        self.session_present = None
        self.cond = threading.Condition()
        if will:
            self.c.will_set(will[0], will[1], qos=1)
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.granted = None

    def _on_connect(self, client, userdata, flags, reason, props):
        with self.cond:
            self.connack = reason
            self.session_present = flags.session_present
            self.cond.notify_all()

    def _on_message(self, client, userdata, msg):
        with self.cond:
            self.msgs.append((msg.topic, msg.payload.decode(), msg.qos, msg.retain))
            self.cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reasons, props):
        with self.cond:
            self.granted = [r.value for r in reasons]
            self.cond.notify_all()

    def wait(self, pred, timeout=WAIT):
        with self.cond:
            return self.cond.wait_for(pred, timeout)

    def connect(self):
        if self.v5:
            self.c.connect(HOST, PORT, keepalive=self.keepalive, clean_start=self.clean)
        else:
            self.c.connect(HOST, PORT, keepalive=self.keepalive)
        self.c.loop_start()
        if not self.wait(lambda: self.connack is not None):
            raise RuntimeError("no CONNACK")
        if self.connack.is_failure:
            raise RuntimeError(f"CONNACK {self.connack}")
        return self

    def subscribe(self, topic, qos):
        self.granted = None
        self.c.subscribe(topic, qos)
        if not self.wait(lambda: self.granted is not None):
            raise RuntimeError("no SUBACK")
        return self.granted

    def publish(self, topic, payload, qos=1, retain=False):
        info = self.c.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(WAIT)
        if not info.is_published():
            raise RuntimeError("publish not acknowledged")

    def disconnect(self):
        self.c.disconnect()
        self.c.loop_stop()

    def vanish(self):
        """Drop the TCP connection without DISCONNECT (the will is due)."""
        self.c.loop_stop()
        sock = self.c.socket()
        if sock is not None:
            sock.close()


failures = 0


def check(name, fn):
    global failures
    try:
        detail = fn()
        print(f"PASS {name}: {detail}")
    except Exception as e:  # noqa: BLE001 - every failure is reported, then counted
        failures += 1
        print(f"FAIL {name}: {e}")


def keep_alive_0(v5):
    c = Client(cid("ka0"), v5=v5, keepalive=0).connect()
    sub_topic = f"paho/ka0/{uuid.uuid4().hex[:6]}"
    c.subscribe(sub_topic, 1)
    c.publish(sub_topic, "ping", qos=1)
    ok = c.wait(lambda: len(c.msgs) >= 1)
    c.disconnect()
    if not ok:
        raise RuntimeError("connected, but no message round trip")
    return "CONNACK success and a round trip"


def persistent_session():
    sid = cid("persist")
    topic = f"paho/persist/{uuid.uuid4().hex[:6]}"
    a = Client(sid, clean=False).connect()
    a.subscribe(topic, 1)
    a.disconnect()
    p = Client(cid("pub")).connect()
    p.publish(topic, "while-away", qos=1)
    p.disconnect()
    a = Client(sid, clean=False).connect()
    got = a.wait(lambda: any(m[1] == "while-away" for m in a.msgs))
    present = a.session_present
    a.disconnect()
    if not got:
        raise RuntimeError(f"message queued while away not delivered (session_present={present})")
    return f"queued message delivered, session_present={present}"


def will():
    topic = f"paho/will/{uuid.uuid4().hex[:6]}"
    s = Client(cid("wsub")).connect()
    s.subscribe(topic, 1)
    w = Client(cid("wdev"), will=(topic, "gone")).connect()
    w.vanish()
    got = s.wait(lambda: any(m[0] == topic and m[1] == "gone" for m in s.msgs))
    s.disconnect()
    if not got:
        raise RuntimeError("will not delivered")
    return "will delivered after an abrupt close"


def retained():
    topic = f"paho/ret/{uuid.uuid4().hex[:6]}"
    p = Client(cid("rpub")).connect()
    p.publish(topic, "kept", qos=1, retain=True)
    p.disconnect()
    s = Client(cid("rsub")).connect()
    s.subscribe(topic, 1)
    got = s.wait(lambda: len(s.msgs) >= 1)
    msgs = list(s.msgs)
    s.disconnect()
    if not got or msgs[0][1] != "kept" or not msgs[0][3]:
        raise RuntimeError(f"retained message not delivered with retain set: {msgs}")
    return "retained message delivered to a later subscriber, retain flag set"


def overlapping():
    base = f"paho/ov/{uuid.uuid4().hex[:6]}"
    s = Client(cid("ovsub")).connect()
    s.subscribe(f"{base}/#", 1)
    s.subscribe(f"{base}/+", 1)
    p = Client(cid("ovpub")).connect()
    p.publish(f"{base}/x", "one", qos=1)
    p.disconnect()
    s.wait(lambda: len(s.msgs) >= 2, timeout=2.0)
    n = len(s.msgs)
    s.disconnect()
    # MQTT 3.1.1 allows one delivery or one per matching subscription.
    if n not in (1, 2):
        raise RuntimeError(f"{n} deliveries")
    return f"{n} delivery(ies) for two overlapping subscriptions"


def qos_downgrade():
    topic = f"paho/down/{uuid.uuid4().hex[:6]}"
    s = Client(cid("dsub")).connect()
    granted = s.subscribe(topic, 0)
    p = Client(cid("dpub")).connect()
    p.publish(topic, "q1", qos=1)
    p.disconnect()
    got = s.wait(lambda: len(s.msgs) >= 1)
    msgs = list(s.msgs)
    s.disconnect()
    if not got or msgs[0][2] != 0:
        raise RuntimeError(f"QoS 1 publish to a QoS 0 subscription: {msgs}")
    return f"granted {granted}, delivered at QoS 0"


def v5_user_property():
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    topic = f"paho/v5/{uuid.uuid4().hex[:6]}"
    got = []
    s = Client(cid("v5sub"), v5=True).connect()
    s.c.on_message = lambda c, u, m: got.append(getattr(m.properties, "UserProperty", None))
    s.subscribe(topic, 1)
    p = Client(cid("v5pub"), v5=True).connect()
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("k", "v")
    info = p.c.publish(topic, "x", qos=1, properties=props)
    info.wait_for_publish(WAIT)
    p.disconnect()
    deadline = time.time() + WAIT
    while not got and time.time() < deadline:
        time.sleep(0.05)
    s.disconnect()
    if not got or got[0] != [("k", "v")]:
        raise RuntimeError(f"user property not delivered: {got}")
    return "user property delivered v5 → v5"


check("keep-alive 0 (3.1.1)", lambda: keep_alive_0(False))
check("keep-alive 0 (5)", lambda: keep_alive_0(True))
check("persistent session", persistent_session)
check("will", will)
check("retained", retained)
check("overlapping subscriptions", overlapping)
check("QoS downgrade to the granted QoS", qos_downgrade)
check("MQTT 5 user property", v5_user_property)
sys.exit(failures)
