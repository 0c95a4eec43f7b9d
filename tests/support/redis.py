"""
A private redis-server (Debian's package) for the fleet tests: on a free
loopback port and a Unix socket in a temporary directory, no persistence,
stopped and started again on the same port (the outage tests).

    server = RedisServer()            # RedisServer.missing_reason when not installed
    await server.start()              # waits (bounded) until it answers PING
    server.url                        # redis://127.0.0.1:PORT/0
    server.socket                     # its Unix socket
    await server.stop()               # SIGTERM, wait; start() again later
    server.close()                    # stop for good, remove the directory
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

from twisted.internet import reactor, task

from tests.support.ports import free_port

REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None
)


class RedisServer:
    """One redis-server process at a time, always on the same port."""

    missing_reason = "redis-server (Debian package redis-server) is not installed"

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="ra-redis-")
        self.port = free_port()
        self.socket = os.path.join(self.directory, "redis.sock")
        self.process: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        """Whether redis-server is installed."""
        return REDIS_SERVER is not None

    @property
    def url(self) -> str:
        """The TCP address as relayagent_redis takes it."""
        return f"redis://127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        """Whether it answers PING now."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as probe:
                probe.sendall(b"PING\r\n")
                return probe.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    async def start(self, timeout: float = 10.0) -> None:
        """Start it, and wait until it answers."""
        assert REDIS_SERVER is not None
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
             "--unixsocket", self.socket, "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", self.directory],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("redis-server did not start")
            await task.deferLater(reactor, 0.05, lambda: None)

    async def stop(self) -> None:
        """Stop it (SIGTERM), and wait for the process to end."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            deadline = time.monotonic() + 10
            while self.process.poll() is None and time.monotonic() < deadline:
                await task.deferLater(reactor, 0.05, lambda: None)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def close(self) -> None:
        """Kill it if it runs, and remove its directory."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None
        shutil.rmtree(self.directory, ignore_errors=True)
