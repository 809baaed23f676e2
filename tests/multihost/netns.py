"""Several hosts on one machine: network namespaces joined by veth pairs and a bridge.

Each host is a namespace with one interface `eth0` (10.231.0.<i+1>/24) whose
veth peer sits on a bridge in a separate switch namespace, so nothing here
touches the machine's own network: traffic can only reach the other hosts'
addresses (and each host's own loopback). Faults are inflicted from outside:
`cut(i)` takes host i's switch port down, `impair()` adds latency and loss.

Latency and loss use the kernel's `tc netem` where it exists. Kernels built
without netem (this project's CI machines among them) get the same effect
from `impair.py`: a userspace forwarder between TUN devices, one per host on
a second subnet (10.232.0.<i+1>/24), that holds each packet for the delay
and drops a random share. TCP sees real loss and delay either way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SUBNET = "10.231.0"
IMPAIRED_SUBNET = "10.232.0"
IMPAIR = str(Path(__file__).with_name("impair.py"))


class FabricError(RuntimeError):
    pass


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise FabricError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if shutil.which("ip") is None:
        return "iproute2's `ip` command is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CI runs as root)"
    probe = f"sc-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except FabricError as e:
        return f"cannot create a network namespace: {e}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=20)
    return None


class Fabric:
    """`hosts` namespaces on one bridge; `down()` removes every trace."""

    def __init__(self, hosts: int, name: str = "") -> None:
        self.tag = f"sc{os.getpid()}{name}"  # `name` tells apart fabrics of one process
        self.switch = f"{self.tag}-sw"
        self.names = [f"{self.tag}-h{i}" for i in range(hosts)]
        self.impairer: subprocess.Popen[str] | None = None
        self.impaired_by = ""

    def up(self) -> Fabric:
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i, ns in enumerate(self.names):
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", self.switch, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
                _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        self.unimpair()
        for ns in [*self.names, self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)

    def addr(self, i: int, impaired: bool = False) -> str:
        return f"{IMPAIRED_SUBNET if impaired else SUBNET}.{i + 1}"

    def popen(self, i: int, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """Start `argv` inside host i."""
        return subprocess.Popen(["ip", "netns", "exec", self.names[i], *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=dict(os.environ, **(env or {})))

    def cut(self, i: int) -> None:
        """Unplug host i: its switch port goes down, packets to and from it vanish."""
        _ip("-n", self.switch, "link", "set", f"p{i}", "down")

    def mend(self, i: int) -> None:
        _ip("-n", self.switch, "link", "set", f"p{i}", "up")

    def impair(self, delay_ms: float, loss: float) -> bool:
        """Delay and drop packets between every pair of hosts.

        True: the kernel's netem does it on eth0 (use `addr(i)`); False: netem is
        missing and impair.py does it on the second subnet (use `addr(i, impaired=True)`).
        """
        try:
            for ns in self.names:
                subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", "eth0", "root", "netem",
                                "delay", f"{delay_ms}ms", "loss", f"{loss * 100}%"],
                               check=True, capture_output=True, text=True, timeout=20)
            self.impaired_by = "tc netem"
            return True
        except (subprocess.CalledProcessError, FileNotFoundError):
            for ns in self.names:
                subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", "eth0", "root"], capture_output=True)
        self.impairer = subprocess.Popen(
            ["ip", "netns", "exec", self.switch, sys.executable, IMPAIR, "--hosts", ",".join(self.names),
             "--subnet", IMPAIRED_SUBNET, "--delay-ms", str(delay_ms), "--loss", str(loss)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.impairer.stdout is not None
        deadline = time.monotonic() + 20
        line = ""
        while time.monotonic() < deadline and "READY" not in line:
            line = self.impairer.stdout.readline()
            if not line and self.impairer.poll() is not None:
                raise FabricError(f"impair.py failed: {self.impairer.stderr.read() if self.impairer.stderr else ''}")
        self.impaired_by = "impair.py (userspace netem over TUN; this kernel has no sch_netem)"
        return False

    def unimpair(self) -> dict[str, int]:
        """Remove the impairment; the forwarder's packet counts when it was the one."""
        counts: dict[str, int] = {}
        for ns in self.names:
            subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", "eth0", "root"], capture_output=True)
        if self.impairer is not None:
            self.impairer.terminate()
            out, _ = self.impairer.communicate(timeout=20)
            for line in out.splitlines():
                if line.startswith("COUNTS "):
                    counts = {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}
            self.impairer = None
        return counts
