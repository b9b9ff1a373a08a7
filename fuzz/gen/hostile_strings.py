#!/usr/bin/env python3
"""Writes the seed inputs for issue 10's shapes (non-UTF-8 short strings in deliver,
return and get-ok; malformed close texts; trailing bytes; confirms for tags never
published; channel.flow floods) in the `engine` and `frame_decoder` harness formats of
src/fuzzing.rs. Run from the repository root: python3 fuzz/gen/hostile_strings.py"""

import os
import struct

END = 0xCE


def frame(kind, ch, payload):
    return bytes([kind]) + struct.pack(">HI", ch, len(payload)) + payload + bytes([END])


def short(b):
    return bytes([len(b)]) + b


def method(ch, cls, mid, args=b""):
    return frame(1, ch, struct.pack(">HH", cls, mid) + args)


def header(ch, size, props=b"\x00\x00"):
    return frame(2, ch, struct.pack(">HHQ", 60, 0, size) + props)


def body(ch, b):
    return frame(3, ch, b)


def content(ch, b):
    return header(ch, len(b)) + body(ch, b)


def deliver(ch, ctag, tag, ex, rk, extra=b""):
    return method(ch, 60, 60, short(ctag) + struct.pack(">QB", tag, 0) + short(ex) + short(rk) + extra)


def get_ok(ch, tag, ex, rk, count=0, extra=b""):
    return method(ch, 60, 71, struct.pack(">QB", tag, 0) + short(ex) + short(rk) + struct.pack(">I", count) + extra)


def ret(ch, code, text, ex, rk, extra=b""):
    return method(ch, 60, 50, struct.pack(">H", code) + short(text) + short(ex) + short(rk) + extra)


def close(ch, code, text_len, text, trailing=b""):
    cls, mid = (10, 50) if ch == 0 else (20, 40)
    return method(ch, cls, mid, struct.pack(">HB", code, text_len) + text + b"\x00\x00\x00\x00" + trailing)


def open_ok(ch):
    return method(ch, 20, 11, struct.pack(">I", 0))


def consume_ok(ch, tag):
    return method(ch, 60, 21, short(tag))


def select_ok(ch):
    return method(ch, 85, 11)


def ack(ch, tag, multiple):
    return method(ch, 60, 80, struct.pack(">QB", tag, 1 if multiple else 0))


def flow(ch):
    return method(ch, 20, 20, b"\x01")


# ---- engine harness input: [cfg][max_message_size][depth] then steps ----
PREFIX = bytes([0x10, 0x03, 0x10])  # frame_max 4096, 1 channel, no heartbeat, 1 MiB, depth 17
OPEN = bytes([0x08])


def raw(b):
    """Raw server bytes, split into steps of at most 599 bytes."""
    out = b""
    while b:
        piece, b = b[:599], b[599:]
        out += bytes([0x06]) + struct.pack(">H", len(piece)) + piece
    return out


CONSUME = bytes([0x09, 0x00, 0x02, 0x00])  # rpc: consume, capacity 3, ack mode
CONSUME_NO_ACK = bytes([0x09, 0x00, 0x02, 0x01])
GET = bytes([0x09, 0x02, 0x00])  # rpc: basic.get
TAKE_ALL = bytes([0x0C, 0x02, 0x03])  # the application takes up to 3


def engine_inputs():
    setup = PREFIX + OPEN + raw(open_ok(1))
    consuming = setup + CONSUME + raw(consume_ok(1, b"ctag"))
    yield "deliver-non-utf8-routing-key-and-exchange", consuming + raw(
        deliver(1, b"ctag", 1, b"ex\xff", b"rk\xfe\xff") + content(1, b"bad")
        + deliver(1, b"ctag", 2, b"", b"\xc3(") + content(1, b"bad2")
        + deliver(1, b"ctag", 3, b"ex", b"rk") + content(1, b"good")
    ) + TAKE_ALL
    yield "deliver-trailing-and-truncated-tail", consuming + raw(
        deliver(1, b"ctag", 1, b"ex", b"rk", extra=b"\x01\x02\x03") + content(1, b"x")
        + method(1, 60, 60, short(b"ctag") + struct.pack(">Q", 2) + b"\x00\x05ab") + content(1, b"y")
    ) + TAKE_ALL
    yield "deliver-non-utf8-consumer-tag", consuming + raw(
        deliver(1, b"c\xfftag", 1, b"", b"q") + content(1, b"orphan")
    )
    yield "deliver-truncated-before-tag", consuming + raw(method(1, 60, 60, short(b"ctag") + b"\x00\x00"))
    yield "get-ok-non-utf8-exchange", setup + GET + raw(get_ok(1, 1, b"\xff\xff", b"rk", 4) + content(1, b"got"))
    yield "return-non-utf8-routing-key", setup + raw(
        ret(1, 312, b"NO_ROUTE \xff", b"ex", b"\x80rk") + content(1, b"back")
        + ret(1, 312, b"NO_ROUTE", b"ex", b"rk", extra=b"\x00") + content(1, b"back2")
    )
    yield "channel-close-non-utf8-text-trailing", setup + raw(close(1, 406, 5, b"\xffbad!", b"\x09\x09"))
    yield "channel-close-text-longer-than-frame", setup + raw(close(1, 404, 200, b"short"))
    yield "connection-close-320-non-utf8-text", setup + raw(close(0, 320, 12, b"FORCED \xfe\xff!!!", b"\x00"))
    yield "connection-close-without-text", setup + raw(method(0, 10, 50, b"\x01\x93"))
    yield "orphan-delivery-no-consumers", setup + raw(deliver(1, b"nobody", 1, b"", b"q") + content(1, b"x"))
    yield "orphan-delivery-after-no-ack-consumer", setup + CONSUME_NO_ACK + raw(
        consume_ok(1, b"auto") + deliver(1, b"other", 1, b"", b"q") + content(1, b"x")
    )
    yield "ack-without-confirm-mode", setup + raw(ack(1, 1, False))
    yield "ack-multiple-on-channel-not-in-confirm-mode", setup + raw(ack(1, 5, True))
    yield "channel-flow-flood", setup + raw(flow(1) * 200) + raw(flow(1) * 200) + raw(flow(1) * 200)


def frame_decoder_inputs():
    seed = struct.pack(">Q", 0x9E3779B97F4A7C15)
    stream = (
        deliver(1, b"ctag", 1, b"ex\xff", b"rk\xfe") + content(1, b"bad")
        + ret(1, 312, b"\xff", b"ex", b"\x80") + content(1, b"r")
        + get_ok(1, 2, b"\xff", b"rk") + content(1, b"g")
        + close(1, 406, 200, b"short") + close(0, 320, 3, b"\xff\xfe\xfd", b"xx")
    )
    yield "non-utf8-short-strings-and-close-texts", bytes([0x00]) + seed + stream


def write(dirs, name, data):
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    for name, data in engine_inputs():
        write(["fuzz/corpus/engine", "tests/fuzz-regressions/engine"], name, data)
    for name, data in frame_decoder_inputs():
        write(["fuzz/corpus/frame_decoder"], name, data)
