"""A TCP proxy on 127.0.0.1 that can go silent: ``pause()`` stops forwarding in both directions
but keeps every socket open (a network or middlebox that drops traffic without resetting
anything); ``resume()`` forwards what was held back; ``drop()`` closes every connection (a
failover). For tests only: threads, no limits beyond
``max_connections``."""

from __future__ import annotations

import select
import socket
import threading


class SilentProxy:
    def __init__(self, target_host: str, target_port: int, max_connections: int = 64) -> None:
        self.target = (target_host, target_port)
        self.max_connections = max_connections
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.forwarding = threading.Event()
        self.forwarding.set()
        self.closed = False
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self._spawn(self._accept, "proxy-accept")

    def _spawn(self, target, name, *args) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self.threads.append(thread)
        thread.start()

    def pause(self) -> None:
        self.forwarding.clear()

    def resume(self) -> None:
        self.forwarding.set()

    def drop(self) -> None:
        """Close every connection it forwards, keep accepting new ones: what clients see when a
        failover moves the server's address (their sessions end without a word from the server)."""
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.sockets = [s for s in self.sockets if s.fileno() != -1]
                if len(self.sockets) >= 2 * self.max_connections:
                    client.close()
                    continue
                self.sockets.append(client)
            # The upstream connection is made at once (as a middlebox would have done before it
            # went silent); nothing is forwarded on it while paused.
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.sockets.append(upstream)
            self._spawn(self._pump, "proxy-pump", client, upstream)

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        try:
            while not self.closed:
                if not self.forwarding.wait(0.05):
                    continue
                readable, _, _ = select.select([a, b], [], [], 0.05)
                for sock in readable:
                    if not self.forwarding.is_set():
                        break
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except OSError:
            return
        finally:
            for sock in (a, b):
                try:
                    sock.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.closed = True
        self.forwarding.set()
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                try:
                    sock.close()
                except OSError:
                    pass
        for thread in self.threads:
            thread.join(timeout=2)
