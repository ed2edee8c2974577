"""A real ``redis-server`` for the shared-limits tests: a free port, a temp dir, no persistence;
and a real Redis Cluster of a few of them.

Redis cannot listen on port 0, so a free port is found by binding a socket
first.  :meth:`RedisServer.stop` and :meth:`RedisServer.start` again (same
port) are how the tests take Redis away mid-load and bring it back.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import hiredis

from tests.support import LOOPBACK


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class RedisServer:
    def __init__(
        self, directory: Path, password: str | None = None, cpu: str | None = None, unix_socket: str | None = None
    ) -> None:
        self.directory = directory
        self.password = password
        self.unix_socket = unix_socket  # listens there too
        self.extra_args: list[str] = []  # more redis-server options (a cluster node's)
        self.cpu = cpu  # pinned to this CPU with taskset (the benchmarks)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{LOOPBACK}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        # SIDECAR_TEST_REDIS_SERVER: another server binary to run the same tests on (a valkey-server).
        binary = os.environ.get("SIDECAR_TEST_REDIS_SERVER") or shutil.which("redis-server")
        assert binary is not None, "redis-server is not installed (.ci/run installs it)"
        args = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            LOOPBACK,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--loglevel",
            "warning",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        if self.unix_socket:
            args += ["--unixsocket", self.unix_socket, "--unixsocketperm", "700"]
        args += self.extra_args
        if self.cpu is not None:
            args = ["taskset", "-c", self.cpu, *args]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ping():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def ping(self) -> bool:
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.5) as sock:
                if self.password:
                    sock.sendall(f"AUTH {self.password}\r\n".encode())
                    sock.recv(64)
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def command(self, *words: str) -> bytes:
        """One command in inline form; the first line of the reply (for a test's own checks)."""
        with socket.create_connection((LOOPBACK, self.port), timeout=2) as sock:
            if self.password:
                sock.sendall(f"AUTH {self.password}\r\n".encode())
                sock.recv(64)
            sock.sendall((" ".join(words) + "\r\n").encode())
            return sock.recv(4096)

    def query(self, *words: str | int, db: int = 0) -> Any:
        """One command, its whole reply parsed (bytes, ints, lists; an error reply is raised)."""
        return query(self.port, *words, password=self.password, db=db)

    def clients(self, name_prefix: str = "sidecar-") -> list[dict[str, str]]:
        """CLIENT LIST, the connections whose name starts with ``name_prefix`` (the sidecars')."""
        listed = self.query("CLIENT", "LIST").decode()
        entries = [dict(field.split("=", 1) for field in line.split() if "=" in field) for line in listed.splitlines()]
        return [entry for entry in entries if entry.get("name", "").startswith(name_prefix)]


def query(port: int, *words: str | int, password: str | None = None, host: str = LOOPBACK, db: int = 0) -> Any:
    """One command to the Redis at ``port`` (in database ``db``); its reply parsed with hiredis."""
    reader = hiredis.Reader()
    with socket.create_connection((host, port), timeout=5) as sock:
        commands: list[tuple[str | int, ...]] = [("AUTH", password)] if password else []
        if db:
            commands.append(("SELECT", db))
        commands.append(words)
        for command in commands:
            sock.sendall(_pack(*command))
            reply: Any = False
            while reply is False:
                data = sock.recv(65536)
                assert data, "Redis closed the connection"
                reader.feed(data)
                reply = reader.gets()
            if isinstance(reply, hiredis.ReplyError):
                raise reply
    return reply


def _pack(*words: str | int) -> bytes:
    parts = [str(word).encode() for word in words]
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(part), part) for part in parts)


class RedisCluster:
    """A real Redis Cluster of ``masters`` redis-server processes (no replicas) on free ports.

    Made with ``redis-cli --cluster create``; :meth:`move_slot` hands one hash slot and its keys
    to another node the way a resharding does (IMPORTING / MIGRATING, MIGRATE, SETSLOT NODE).
    """

    def __init__(self, directory: Path, masters: int = 3) -> None:
        self.nodes = []
        for index in range(masters):
            node_dir = directory / f"cluster-{index}"
            node_dir.mkdir(parents=True, exist_ok=True)
            self.nodes.append(RedisServer(node_dir))

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, timeout: float = 30.0) -> RedisCluster:
        for node in self.nodes:
            # The cluster bus on a free port of its own: the default (port + 10000) may be taken or past 65535.
            bus = ["--cluster-port", str(free_port())]
            node.extra_args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", *bus]
            node.start()
        addresses = [f"{LOOPBACK}:{node.port}" for node in self.nodes]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        deadline = time.monotonic() + timeout
        while not all(b"cluster_state:ok" in node.query("CLUSTER", "INFO") for node in self.nodes):
            assert time.monotonic() < deadline, "the cluster did not become ok"
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def node_id(self, node: RedisServer) -> str:
        return str(node.query("CLUSTER", "MYID").decode())

    def owner(self, slot: int) -> RedisServer:
        for start, end, primary, *_ in self.nodes[0].query("CLUSTER", "SLOTS"):
            if int(start) <= slot <= int(end):
                return next(node for node in self.nodes if node.port == int(primary[1]))
        raise AssertionError(f"no node serves slot {slot}")

    def move_slot(self, slot: int, target: RedisServer) -> None:
        source = self.owner(slot)
        source_id, target_id = self.node_id(source), self.node_id(target)
        target.query("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.query("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while keys := source.query("CLUSTER", "GETKEYSINSLOT", slot, 100):
            source.query("MIGRATE", LOOPBACK, target.port, "", 0, 5000, "KEYS", *(k.decode() for k in keys))
        for node in self.nodes:
            node.query("CLUSTER", "SETSLOT", slot, "NODE", target_id)
