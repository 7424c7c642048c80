"""A Ray cluster of network and mount namespaces on this machine, for the cluster tests and
bench/cluster.py.

It drives examples/cluster/nscluster.sh, the recipe a user reads: every node is a network
namespace with its own address on a bridge (10.231.X.0/24, X unique per cluster) and a mount
namespace with its own tmpfs /tmp and /dev/shm; Ray runs on each with token authentication; an
S3-protocol server (moto) on the bridge holds what all nodes share. Each cluster takes a fresh
prefix and subnet, records its owner process, and clears the leftovers of clusters whose owner is
gone (a crashed run) before it starts. Needs root and `ip netns`; `why_not()` says what is missing.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "cluster" / "nscluster.sh"
STATE_ROOT = Path("/var/tmp/simfed-nscluster")
BASE = "snc"  # name prefix of everything the harness makes: snc<X>-head, snc<X>-br, ...
RAY_PORT, S3_PORT = 6379, 9000
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


def why_not() -> str | None:
    """Why this machine cannot host a namespace cluster (None: it can)."""
    if not sys.platform.startswith("linux"):
        return "namespace clusters need Linux"
    if os.geteuid() != 0:
        return "namespace clusters need root (network and mount namespaces)"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"namespace clusters need `{tool}` (iproute2, util-linux)"
    name = f"{BASE}probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    return None


def _start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _owner_alive(state: Path) -> bool:
    try:
        pid, started = (state / "owner").read_text().split()
    except (OSError, ValueError):
        return time.time() - state.stat().st_mtime < 60  # being set up right now
    return _start_time(int(pid)) == started


class NsCluster:
    """One namespace cluster: `up()`, run things on its nodes, `down()`."""

    def __init__(self, nodes: tuple[str, ...] = ("head", "w1", "w2"), cpus: int = 2, python: str = sys.executable):
        self.nodes, self.cpus, self.python = list(nodes), cpus, python
        self.prefix, self.net, self.state = self._claim()

    def _claim(self) -> tuple[str, str, Path]:
        """A prefix and /24 no other cluster on this machine uses (mkdir of its state directory is the lock)."""
        STATE_ROOT.mkdir(parents=True, exist_ok=True)
        used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
        for x in range(100, 250):
            state = STATE_ROOT / f"{BASE}{x}"
            if f" 10.231.{x}." in used:
                continue
            try:
                state.mkdir()
            except FileExistsError:
                continue
            (state / "owner").write_text(f"{os.getpid()} {_start_time(os.getpid())}")
            return f"{BASE}{x}", f"10.231.{x}", state
        raise RuntimeError(f"no free 10.231.X.0/24 for a namespace cluster; clear {STATE_ROOT}")

    # -- the recipe script
    def env(self, prefix: str | None = None) -> dict:
        prefix = prefix or self.prefix
        return {**os.environ, "NSC_PREFIX": prefix, "NSC_NET": self.net, "NSC_NODES": " ".join(self.nodes),
                "NSC_CPUS": str(self.cpus), "NSC_PYTHON": self.python, "NSC_STATE": str(STATE_ROOT / prefix)}

    def sh(self, *args: str, check: bool = True, timeout: float = 300, prefix: str | None = None):
        proc = subprocess.run(["bash", str(SCRIPT), *args], env=self.env(prefix), capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"nscluster.sh {' '.join(args)}: {proc.stderr.strip()[-2000:]}")
        return proc

    def up(self) -> "NsCluster":
        clear_leftovers(self)
        self.sh("up")
        return self

    def down(self) -> None:
        self.sh("down", check=False)

    # -- nodes
    @property
    def head_address(self) -> str:
        return f"{self.ip(self.nodes[0])}:{RAY_PORT}"

    def ip(self, node: str) -> str:
        return (self.state / f"{node}.ip").read_text().strip()

    def holder(self, node: str) -> int:
        return int((self.state / f"{node}.pid").read_text())

    def root(self, node: str) -> Path:
        """The node's file system as this process sees it (its /tmp is private to it)."""
        return Path(f"/proc/{self.holder(node)}/root")

    def token(self) -> str:
        return (self.state / "token").read_text().strip()

    def command(self, node: str, *argv: str, env: dict | None = None) -> list[str]:
        """argv run inside `node` with the cluster's token, plus `env` (None values unset)."""
        pairs = [f"-u{k}" for k, v in (env or {}).items() if v is None]
        pairs += [f"{k}={v}" for k, v in (env or {}).items() if v is not None]
        return ["bash", str(SCRIPT), "exec", node, "env", *pairs, *argv]

    def run(self, node: str, *argv: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(node, *argv, env=env), env=self.env(), capture_output=True, text=True,
                              timeout=timeout, cwd="/")

    def popen(self, node: str, *argv: str, env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
        out = open(log, "w") if log else subprocess.DEVNULL
        return subprocess.Popen(self.command(node, *argv, env=env), env=self.env(), stdout=out, stderr=out, cwd="/")

    def simfed(self, node: str, *args: str, env: dict | None = None, timeout: float = 600):
        return self.run(node, str(Path(self.python).with_name("simfed")), *args, env=env, timeout=timeout)

    def add(self, node: str) -> None:
        self.sh("add", node)

    def kill(self, node: str) -> None:
        self.sh("kill", node)

    def pids(self, node: str) -> list[int]:
        return [int(p) for p in self.sh("pids", node, check=False).stdout.split()]

    # -- what all nodes share
    def s3_uri(self, key: str) -> str:
        return (f"s3://testing:testing@simfed/{key}?endpoint_override={self.net}.1:{S3_PORT}&scheme=http"
                "&region=us-east-1")

    def upload(self, local: str | Path, key: str) -> str:
        """A local directory copied to the S3 server; its URI."""
        import pyarrow.fs as pafs

        uri = self.s3_uri(key)
        fs, inner = pafs.FileSystem.from_uri(uri)
        for path in sorted(Path(local).iterdir()):
            with fs.open_output_stream(f"{inner}/{path.name}") as f:
                f.write(path.read_bytes())
        return uri

    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.ip_network(f"{self.net}.0/24")

    def node_names(self, alive: bool = False) -> dict[str, str]:
        """Ray node id -> node name (of every node that ever joined, or the live ones), asked from the head."""
        code = ("import json, ray; ray.init(address=%r, log_to_driver=False, logging_level='ERROR'); "
                "print(json.dumps({n['NodeID']: n['NodeManagerAddress'] for n in ray.nodes() if n['Alive'] or %r}))"
                % (self.head_address, not alive))
        proc = self.run(self.nodes[0], self.python, "-c", code, timeout=300)
        by_ip = {self.ip(n): n for n in self.nodes if (self.state / f"{n}.ip").exists()}
        return {nid: by_ip.get(ip, ip) for nid, ip in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


def clear_leftovers(current: NsCluster | None = None) -> None:
    """Remove clusters of this harness whose owner process is gone, and namespaces/links without state."""
    keep = {current.prefix} if current else set()
    states = {p.name: p for p in STATE_ROOT.glob(f"{BASE}*") if p.is_dir()} if STATE_ROOT.is_dir() else {}
    names = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    names += subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    seen = {w.split("-")[0] for w in names.replace(":", " ").replace("@", " ").split()
            if w.startswith(BASE) and "-" in w and w.split("-")[0][len(BASE):].isdigit()}
    for prefix in sorted((set(states) | seen) - keep):
        state = states.get(prefix)
        if state is not None and _owner_alive(state):
            continue
        env = {**os.environ, "NSC_PREFIX": prefix, "NSC_STATE": str(STATE_ROOT / prefix)}
        subprocess.run(["bash", str(SCRIPT), "down"], env=env, capture_output=True, timeout=120)


def _hex_address(text: str) -> str:
    """An address of /proc/net/tcp or tcp6 (hex, little-endian 32-bit words) as text."""
    raw = bytes.fromhex(text)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def processes(cluster: NsCluster, node: str) -> list[str]:
    """The first word of each command line of the node's processes (Ray names its actors' processes
    ray::ClassName)."""
    out = []
    for pid in cluster.pids(node):
        try:
            out.append(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace"))
        except OSError:  # ended meanwhile
            continue
    return out


def listeners(cluster: NsCluster, node: str) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of the node's processes."""
    owner: dict[str, str] = {}
    for pid in cluster.pids(node):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    owner[target[8:-1]] = name
        except OSError:  # the process ended meanwhile
            continue
    out = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{cluster.holder(node)}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] != "0A":  # LISTEN
                continue
            addr, port = cols[1].split(":")
            out.append((_hex_address(addr), int(port, 16), owner.get(cols[9], "?")))
    return out


def interface_addresses(cluster: NsCluster, node: str) -> set[str]:
    """Every address the node's interfaces carry (what a wildcard listener answers on)."""
    out = subprocess.run(["ip", "-n", f"{cluster.prefix}-{node}", "-o", "addr"], capture_output=True,
                         text=True).stdout
    return {line.split()[3].split("/")[0] for line in out.splitlines()}
