"""The fork server's messages: a length-prefixed JSON object, with file descriptors
(``SCM_RIGHTS``) where the entry hands over its standard streams; and what makes two
processes the same machine to it."""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any

_HEADER = struct.Struct("!I")


def send_message(sock: socket.socket, message: dict[str, Any], fds: list[int] | None = None) -> None:
    body = json.dumps(message).encode()
    data = _HEADER.pack(len(body)) + body
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def _recv_exact(sock: socket.socket, size: int, fds: list[int] | None = None) -> bytes:
    chunks, got = [], 0
    while got < size:
        if fds is not None and not chunks:
            chunk, received, _, _ = socket.recv_fds(sock, size - got, 3)
            fds.extend(received)
        else:
            chunk = sock.recv(size - got)
        if not chunk:
            raise ConnectionError("connection closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def receive_message(sock: socket.socket, fds: list[int] | None = None) -> dict[str, Any]:
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size, fds))
    return json.loads(_recv_exact(sock, size))


def machine_identity() -> dict[str, Any]:
    """What makes two processes the same host to Horovod: hostname and the network, UTS
    and mount namespaces. A worker ``horovodrun`` starts over SSH on another host of a
    shared filesystem finds the socket too; it must run there, not be forked here."""
    identity: dict[str, Any] = {"hostname": socket.gethostname()}
    for name in ("net", "uts", "mnt"):
        try:
            identity[name] = os.stat(f"/proc/self/ns/{name}").st_ino
        except OSError:
            identity[name] = None
    return identity
