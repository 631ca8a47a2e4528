"""Real processes for the tests: redis-server (single, Cluster, Sentinel) and the fanout
edge, each on a free loopback port chosen at run time (never 6379), stopped at the end;
and a small WebSocket client of the edge."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

REPO = Path(__file__).resolve().parents[3]
EDGE_BIN = Path(os.environ.get("FANOUT_EDGE_BIN", REPO / "target" / "debug" / "fanout-edge"))
JWT_SECRET = "python-tests-secret-0123456789abcdef"
ADMIN_TOKEN = "python-tests-admin"


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in (6379, 26379):
            return port


def wait_until(what: str, check: Any, within: float = 20.0, every: float = 0.05) -> Any:
    deadline = time.monotonic() + within
    while True:
        try:
            v = check()
        except RuntimeError:
            raise
        except Exception:
            v = None
        else:
            if v:
                return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {within} s")
        time.sleep(every)


def redis_cli(port: int, *args: str, password: str | None = None) -> str:
    auth = ["--no-auth-warning", "-a", password] if password is not None else []
    out = subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), *auth, *args],
        capture_output=True,
        timeout=10,
        check=True,
    )
    return out.stdout.decode().strip()


def check_alive(proc: subprocess.Popen[bytes] | None, what: str, log: Path) -> None:
    """Raises (ending wait_until at once) when ``proc`` has exited, with its log's tail."""
    if proc is not None and proc.poll() is not None:
        raise RuntimeError(f"{what} exited: {log.read_text()[-2000:]}")


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL if it is still running after 5 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class RedisServer:
    def __init__(self, *args: str, port: int | None = None, password: str | None = None) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="fanout-py-redis-")
        self.password = password
        self.args = list(args) + (["--requirepass", password] if password is not None else [])
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                self.dir,
                "--logfile",
                "redis.log",
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def up() -> bool:
            check_alive(self.proc, "redis-server", Path(self.dir, "redis.log"))
            return self.cli("PING") == "PONG"

        wait_until(f"redis-server on {self.port}", up)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def cli(self, *args: str) -> str:
        return redis_cli(self.port, *args, password=self.password)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisCluster:
    """3 primaries + 3 replicas (redis-cli --cluster create --cluster-replicas 1)."""

    def __init__(self, masters: int = 3, replicas: int = 1) -> None:
        self.nodes: dict[int, RedisServer] = {}
        try:
            for _ in range(masters * (1 + replicas)):
                n = RedisServer(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    # The default bus port (port + 10000) may not exist or be free.
                    "--cluster-port",
                    str(free_port()),
                )
                self.nodes[n.port] = n
            first = next(iter(self.nodes.values()))
            first.cli(
                "--cluster",
                "create",
                *[f"127.0.0.1:{p}" for p in self.nodes],
                "--cluster-replicas",
                str(replicas),
                "--cluster-yes",
            )
            self.wait_settled()
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return "redis-cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.nodes)

    def any(self) -> RedisServer:
        return next(iter(self.nodes.values()))

    def topology(self, seen_from: int) -> list[dict[str, Any]]:
        out = []
        for line in self.nodes[seen_from].cli("CLUSTER", "NODES").splitlines():
            f = line.split()
            port = int(f[1].split("@")[0].rsplit(":", 1)[1])
            out.append(
                {
                    "id": f[0],
                    "port": port,
                    "master": "master" in f[2],
                    "master_id": None if f[3] == "-" else f[3],
                    "slots": f[8:],
                }
            )
        return out

    def keyslot(self, key: str) -> int:
        return int(self.any().cli("CLUSTER", "KEYSLOT", key))

    def owner_of_slot(self, slot: int) -> int:
        for n in self.topology(self.any().port):
            if not n["master"]:
                continue
            for r in n["slots"]:
                if r.startswith("["):
                    continue
                lo, _, hi = r.partition("-")
                if int(lo) <= slot <= int(hi or lo):
                    return int(n["port"])
        raise LookupError(f"no owner for slot {slot}")

    def failover(self, master: int) -> int:
        """CLUSTER FAILOVER on a replica of `master`; returns the new primary's port once
        every node agrees and the cluster is settled."""
        topo = self.topology(master)
        mid = next(n["id"] for n in topo if n["port"] == master)
        replica = next(n["port"] for n in topo if n["master_id"] == mid)
        self.nodes[replica].cli("CLUSTER", "FAILOVER")

        def agreed() -> bool:
            return all(
                any(x["port"] == replica and x["master"] and x["slots"] for x in self.topology(p))
                for p in self.nodes
            )

        wait_until("cluster failover", agreed, within=30)
        self.wait_settled()
        return int(replica)

    def settled(self) -> bool:
        for n in self.nodes.values():
            info = dict(
                line.split(":", 1) for line in n.cli("CLUSTER", "INFO").splitlines() if ":" in line
            )
            repl = n.cli("INFO", "replication")
            if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != "16384":
                return False
            if "role:slave" in repl and "master_link_status:up" not in repl:
                return False
        return True

    def wait_settled(self) -> None:
        wait_until("cluster settled", self.settled, within=30, every=0.1)

    def stop(self) -> None:
        for n in self.nodes.values():
            n.stop()


class RedisSentinel:
    """A primary, one replica and one sentinel (quorum 1) monitoring service `mymaster`."""

    SERVICE = "mymaster"

    def __init__(self) -> None:
        self.primary = RedisServer()
        self.replica = RedisServer("--replicaof", "127.0.0.1", str(self.primary.port))
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="fanout-py-sentinel-")
        conf = Path(self.dir) / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.primary.port} 1\n"
            f"sentinel down-after-milliseconds {self.SERVICE} 1000\n"
            f"sentinel failover-timeout {self.SERVICE} 5000\n"
        )
        self.proc = subprocess.Popen(
            ["redis-server", str(conf), "--sentinel", "--logfile", f"{self.dir}/sentinel.log"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(
                "sentinel knows the synced replica",
                lambda: (
                    str(self.replica.port) in self.cli("SENTINEL", "REPLICAS", self.SERVICE)
                    and "master_link_status:up" in self.replica.cli("INFO", "replication")
                ),
                within=30,
            )
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"redis-sentinel://127.0.0.1:{self.port}/{self.SERVICE}"

    def cli(self, *args: str) -> str:
        return redis_cli(self.port, *args)

    def primary_port(self) -> int:
        return int(self.cli("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE).split()[-1])

    def server(self, port: int) -> RedisServer:
        return self.primary if self.primary.port == port else self.replica

    def failover(self) -> int:
        before = self.primary_port()
        self.cli("SENTINEL", "FAILOVER", self.SERVICE)

        def done() -> int | None:
            now = self.primary_port()
            if now != before and "role:master" in self.server(now).cli("INFO", "replication"):
                return now
            return None

        new: int = wait_until("sentinel failover", done, within=30)
        return new

    def stop(self) -> None:
        stop_process(self.proc)
        self.primary.stop()
        self.replica.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Edge:
    """The fanout edge binary, listening on a free port."""

    def __init__(self, redis_url: str, *extra: str, secret: str | None = JWT_SECRET) -> None:
        if not EDGE_BIN.exists():
            raise FileNotFoundError(f"the edge binary {EDGE_BIN} is missing (FANOUT_EDGE_BIN)")
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="fanout-py-edge-", suffix=".log", delete=False
        )
        args = [
            str(EDGE_BIN),
            "--listen",
            f"127.0.0.1:{self.port}",
            "--redis-url",
            redis_url,
            "--admin-token",
            ADMIN_TOKEN,
            "--drain-secs",
            "0",
            "--node-id",
            f"py-{self.port}",
            *extra,
        ]
        if secret is not None:
            args += ["--jwt-secret", secret]
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_until(f"edge on {self.port} ready", self.ready, within=30)
        except BaseException:
            self.stop()
            print(Path(self.log.name).read_text()[-3000:])
            raise

    def ready(self) -> bool:
        check_alive(self.proc, "the edge", Path(self.log.name))
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=2) as r:
            return bool(r.status == 200)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)


class WsClient:
    """A WebSocket client of the edge (fanout.json subprotocol)."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.next_id = 0

    @classmethod
    async def connect(cls, edge: Edge, token: str) -> WsClient:
        conn = await websockets.connect(
            edge.ws_url,
            subprotocols=[websockets.Subprotocol("fanout.json")],
            additional_headers={"Authorization": f"Bearer {token}"},
            open_timeout=10,
            max_queue=None,
        )
        c = cls(conn)
        hello = await c.recv()
        assert hello["type"] == "connected", hello
        return c

    async def send(self, frame: dict[str, Any]) -> None:
        await self.conn.send(json.dumps(frame))

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.conn.recv(), timeout)
        frame: dict[str, Any] = json.loads(raw)
        return frame

    async def subscribe(self, channel: str, **extra: Any) -> dict[str, Any]:
        """Sends subscribe and returns the reply (`subscribed` or `error`)."""
        self.next_id += 1
        await self.send({"type": "subscribe", "id": self.next_id, "channel": channel, **extra})
        while True:
            f = await self.recv()
            if f.get("id") == self.next_id:
                return f

    async def messages(self, channel: str, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while len(out) < n:
            f = await self.recv(timeout)
            if f["type"] == "message" and f["channel"] == channel:
                out.append(f)
        return out

    async def close(self) -> None:
        await self.conn.close()


class RetryCounter(logging.Handler):
    """Counts the publisher's resends (its debug log "failed transiently")."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "failed transiently" in record.getMessage():
            self.count += 1
            self.errors.append(str(record.args[1]) if record.args else "")

    def __enter__(self) -> RetryCounter:
        log = logging.getLogger("fanout")
        self._level = log.level
        log.setLevel(logging.DEBUG)
        log.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        log = logging.getLogger("fanout")
        log.removeHandler(self)
        log.setLevel(self._level)
