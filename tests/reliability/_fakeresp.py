"""A tiny RESP server on a loopback port that answers lock commands with one fixed error.

It stands in for a Redis that is loading its data set (``-LOADING``), a read-only replica
(``-READONLY``), a master that lost its replicas (``-MASTERDOWN``) or a server that wants a
password (``-NOAUTH``): connection set-up commands (``CLIENT``, ``HELLO``, ``SELECT``, ``PING``)
succeed so that the error reaches the lock command itself, as it would on a real server. The
accept and read loops poll a stop flag with short socket timeouts, so :meth:`close` always ends
them.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

from tests._redis_server import free_port


def _read_command(stream: socket.SocketIO, buffer: bytearray) -> list[bytes] | None:
    """Parse one RESP array of bulk strings (all redis-py sends); None on EOF."""

    def line() -> bytes | None:
        while b"\r\n" not in buffer:
            chunk = stream.read(4096)
            if not chunk:
                return None
            buffer.extend(chunk)
        head, _, rest = bytes(buffer).partition(b"\r\n")
        buffer[:] = rest
        return head

    first = line()
    if first is None or not first.startswith(b"*"):
        return None
    parts = []
    for _ in range(int(first[1:])):
        size = line()
        if size is None:
            return None
        length = int(size[1:])
        while len(buffer) < length + 2:
            chunk = stream.read(4096)
            if not chunk:
                return None
            buffer.extend(chunk)
        parts.append(bytes(buffer[:length]))
        del buffer[: length + 2]
    return parts


def _hello(resp3: bool) -> bytes:
    """A HELLO reply (redis-py 8 opens every connection with one)."""
    fields = [
        (b"server", b"+redis"),
        (b"version", b"+7.0.15"),
        (b"proto", b":3" if resp3 else b":2"),
        (b"id", b":1"),
        (b"mode", b"+standalone"),
        (b"role", b"+master"),
        (b"modules", b"*0"),
    ]
    head = b"%%%d\r\n" % len(fields) if resp3 else b"*%d\r\n" % (2 * len(fields))
    return head + b"".join(b"+" + name + b"\r\n" + value + b"\r\n" for name, value in fields)


class FakeRespServer:
    """Answers every non-handshake command with ``error`` (a RESP error line without ``-``)."""

    def __init__(self, error: str) -> None:
        self.error = error
        self.port = free_port()
        self.commands: list[str] = []
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.1)
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        buffer = bytearray()
        with conn:
            stream = socket.SocketIO(conn, "rb")
            while not self._stop.is_set():
                try:
                    command = _read_command(stream, buffer)
                except TimeoutError:
                    continue
                except (OSError, ValueError):
                    return
                if command is None:
                    return
                name = command[0].decode(errors="replace").upper()
                self.commands.append(name)
                if name == "PING":
                    reply = b"+PONG\r\n"
                elif name in ("CLIENT", "SELECT", "AUTH"):
                    reply = b"+OK\r\n"
                elif name == "HELLO":
                    reply = _hello(command[1:2] == [b"3"])
                else:
                    reply = b"-" + self.error.encode() + b"\r\n"
                try:
                    conn.sendall(reply)
                except OSError:
                    return

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        for thread in self._threads:
            thread.join(timeout=2)

    def __enter__(self) -> FakeRespServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
