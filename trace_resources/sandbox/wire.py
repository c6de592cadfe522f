"""The sandbox's wire format: length-prefixed JSON headers, each optionally followed by a
payload of bytes (Arrow IPC), over a Unix socket pair; file descriptors ride as SCM_RIGHTS.

Nothing here unpickles or evaluates what the other side sent: the service reads a worker's
answers as JSON and Arrow IPC only, and every length is checked against a cap before a byte
is read, so a misbehaving worker can not make the service allocate more than the cap.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

__all__ = [
    "WireError",
    "PayloadTooLarge",
    "send",
    "recv",
    "recv_header",
    "payload_size",
    "recv_exact",
    "send_fds",
    "recv_fds",
    "FD_CHUNK",
]

_LEN = struct.Struct("!I")
FD_CHUNK = 64  # descriptors per SCM_RIGHTS message (the kernel takes at most 253)


class WireError(Exception):
    """The other side closed the socket, or sent something that breaks the format."""


class PayloadTooLarge(WireError):
    """A message announced more bytes than the reader allows."""


def send(sock: socket.socket, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
    if payload:
        header = {**header, "payload": len(payload)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    sock.sendall(_LEN.pack(len(raw)) + raw)
    if payload:
        sock.sendall(payload)


def recv_exact(sock: socket.socket, size: int) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            raise WireError("the other side closed the connection")
        got += n
    return buf


def recv_header(sock: socket.socket, *, max_header: int = 1 << 20) -> dict[str, Any]:
    """One message's header; its payload (`header["payload"]` bytes, if any) follows."""
    (size,) = _LEN.unpack(recv_exact(sock, _LEN.size))
    if size > max_header:
        raise WireError(f"a header of {size} bytes is over the {max_header}-byte cap")
    try:
        header = json.loads(recv_exact(sock, size))
    except (ValueError, RecursionError) as exc:
        raise WireError(f"a header is not JSON: {type(exc).__name__}") from None
    if not isinstance(header, dict):
        raise WireError("a header is not a JSON object")
    return header


def payload_size(header: dict[str, Any], max_payload: int | None) -> int:
    length = header.get("payload", 0)
    if not isinstance(length, int) or length < 0:
        raise WireError("a payload length is not a non-negative integer")
    if max_payload is not None and length > max_payload:
        raise PayloadTooLarge(f"a payload of {length} bytes is over the {max_payload}-byte cap")
    return length


def recv(
    sock: socket.socket, *, max_header: int = 1 << 20, max_payload: int | None = None
) -> tuple[dict[str, Any], bytearray]:
    """One message: its header and its payload (empty when it has none)."""
    header = recv_header(sock, max_header=max_header)
    length = payload_size(header, max_payload)
    return header, recv_exact(sock, length) if length else bytearray()


def send_fds(sock: socket.socket, fds: list[int]) -> None:
    """Descriptors in chunks; each chunk is 4 bytes (its count) with the descriptors attached."""
    for start in range(0, len(fds), FD_CHUNK):
        chunk = fds[start : start + FD_CHUNK]
        socket.send_fds(sock, [_LEN.pack(len(chunk))], chunk)


def recv_fds(sock: socket.socket, count: int) -> list[int]:
    out: list[int] = []
    while len(out) < count:
        data, fds, _flags, _addr = socket.recv_fds(sock, _LEN.size, FD_CHUNK)
        if not data:
            raise WireError("the other side closed the connection")
        if len(data) < _LEN.size:
            data += recv_exact(sock, _LEN.size - len(data))
        (expected,) = _LEN.unpack(data)
        if len(fds) != expected:
            for fd in fds:
                _close(fd)
            raise WireError(f"expected {expected} descriptors, got {len(fds)}")
        out.extend(fds)
    return out


def _close(fd: int) -> None:
    import os

    try:
        os.close(fd)
    except OSError:
        pass
