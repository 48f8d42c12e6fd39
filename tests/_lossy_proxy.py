"""A loopback TCP proxy in front of a real redis-server that can lose one reply on purpose.

Armed with a marker (bytes of a command, e.g. a script's SHA), it forwards the next command that
contains the marker, waits for the server's reply, throws the reply away and closes the client's
connection. The server has run the command; the client sees a dropped connection, as it would
after a network cut between the two, and redis-py's ``Retry`` re-sends the same command on a new
connection. Every loop polls a stop flag with short socket timeouts, so :meth:`close` ends them.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

from tests._redis_server import free_port


class LossyProxy:
    """Forwards ``127.0.0.1:<port>`` to ``127.0.0.1:<upstream>``; see :meth:`lose_reply_to`."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = free_port()
        #: Replies thrown away so far.
        self.lost = 0
        self._marker: bytes | None = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._listener.settimeout(0.1)
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def lose_reply_to(self, marker: bytes) -> None:
        """Lose the reply to the next command containing ``marker`` (once)."""
        with self._mutex:
            self._marker = marker

    def _take_marker(self, data: bytes) -> bool:
        with self._mutex:
            if self._marker is not None and self._marker in data:
                self._marker = None
                return True
            return False

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(("127.0.0.1", self.upstream), timeout=2)
        except OSError:
            client.close()
            return
        client.settimeout(0.1)
        server.settimeout(0.1)
        cut = threading.Event()  # set: the next bytes from the server answer a marked command
        up = threading.Thread(target=self._commands, args=(client, server, cut), daemon=True)
        self._threads.append(up)
        up.start()
        try:
            self._pump(server, client, cut)
        finally:
            for sock in (client, server):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            up.join(timeout=2)

    def _commands(self, client: socket.socket, server: socket.socket, cut: threading.Event) -> None:
        """Client to server. redis-py sends a command only after reading the previous reply, so
        whatever the server sends after a marked command is that command's reply."""
        while not self._stop.is_set():
            try:
                data = client.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            if self._take_marker(data):
                cut.set()
            try:
                server.sendall(data)
            except OSError:
                break
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_WR)

    def _pump(self, server: socket.socket, client: socket.socket, cut: threading.Event) -> None:
        """Server to client, until either side closes or a marked command's reply arrives."""
        while not self._stop.is_set():
            try:
                data = server.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            if cut.is_set():
                self.lost += 1
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_RDWR)  # the server ran it; the reply is lost
                return
            try:
                client.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        for thread in self._threads:
            thread.join(timeout=2)

    def __enter__(self) -> LossyProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
