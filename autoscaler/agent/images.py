"""CRIU image files read without CRIU's protobuf schemas.

Why: the agent needs a few fields of a few images (the process tree, the pagemap, the VMAs,
the mapped files) and must not depend on pycriu, which the private CRIU root does not ship.
An image is two 32-bit magics, then entries of (u32 size, protobuf message); a message is read
here into {field number: [values]}, varints as ints and length-delimited fields as bytes (a
nested message or a packed repeated field is decoded again by the caller). Field numbers are
those of CRIU's images/*.proto.
"""

from __future__ import annotations

import struct
from pathlib import Path


def varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The varint at `pos` and the position after it."""
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def packed_varints(buf: bytes) -> list[int]:
    """A packed repeated varint field's values."""
    out, pos = [], 0
    while pos < len(buf):
        value, pos = varint(buf, pos)
        out.append(value)
    return out


def fields(msg: bytes) -> dict[int, list[int | bytes]]:
    """A protobuf message's fields: varints as ints, length-delimited as bytes."""
    out: dict[int, list[int | bytes]] = {}
    pos = 0
    while pos < len(msg):
        key, pos = varint(msg, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = varint(msg, pos)
            out.setdefault(number, []).append(value)
        elif wire == 2:
            length, pos = varint(msg, pos)
            out.setdefault(number, []).append(msg[pos : pos + length])
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return out


def entries(path: Path) -> list[bytes]:
    """The protobuf entries of a CRIU image file."""
    return entries_of(path.read_bytes(), path.name)


def entries_of(data: bytes, name: str) -> list[bytes]:
    """The protobuf entries of a CRIU image's bytes (`name` for errors)."""
    pos, out = 8, []
    while pos + 4 <= len(data):
        (size,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + size > len(data):
            raise ValueError(f"{name}: truncated entry at byte {pos}")
        out.append(data[pos : pos + size])
        pos += size
    return out
