"""A userspace `tc netem` for kernels without it: delay and loss between TUN devices.

    python impair.py --hosts ns0,ns1,ns2 --subnet 10.232.0 --delay-ms 5 --loss 0.01

Makes one TUN device per namespace (`imp<i>`, address <subnet>.<i+1>/24),
moves it into that namespace, and forwards every IPv4 packet from one device to
the device of its destination address after `delay-ms`, dropping a `loss`
share at random. TUN carries whole IP packets, so TCP sees exactly what netem
would give it: late segments and missing ones to retransmit. Prints READY once
forwarding, and `COUNTS forwarded=N dropped=M` when terminated.
"""

from __future__ import annotations

import argparse
import fcntl
import heapq
import os
import random
import selectors
import signal
import struct
import subprocess
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def open_tun(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hosts", required=True)
    p.add_argument("--subnet", required=True)
    p.add_argument("--delay-ms", type=float, default=5.0)
    p.add_argument("--loss", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=None)
    a = p.parse_args()
    rng = random.Random(a.seed)
    delay = a.delay_ms / 1000
    fds: dict[int, int] = {}  # last octet of the address -> TUN fd
    for i, ns in enumerate(a.hosts.split(",")):
        name = f"imp{i}"
        fd = open_tun(name)
        fds[i + 1] = fd
        for cmd in (["ip", "link", "set", name, "netns", ns],
                    ["ip", "-n", ns, "addr", "add", f"{a.subnet}.{i + 1}/24", "dev", name],
                    ["ip", "-n", ns, "link", "set", name, "up"]):
            subprocess.run(cmd, check=True, capture_output=True, timeout=20)
    prefix = bytes(int(x) for x in a.subnet.split("."))
    sel = selectors.DefaultSelector()
    for fd in fds.values():
        sel.register(fd, selectors.EVENT_READ)
    queue: list[tuple[float, int, int, bytes]] = []  # (due, order, fd, packet)
    order = forwarded = dropped = 0
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    print("READY", flush=True)
    while running:
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else 0.2
        for key, _ in sel.select(timeout):
            while True:
                try:
                    pkt = os.read(key.fd, 65536)
                except BlockingIOError:
                    break
                if len(pkt) < 20 or pkt[0] >> 4 != 4 or pkt[16:19] != prefix or pkt[19] not in fds:
                    continue  # not IPv4 to one of our hosts (e.g. IPv6 router solicitations)
                if rng.random() < a.loss:
                    dropped += 1
                    continue
                order += 1
                heapq.heappush(queue, (time.monotonic() + delay, order, fds[pkt[19]], pkt))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, fd, pkt = heapq.heappop(queue)
            try:
                os.write(fd, pkt)
                forwarded += 1
            except (BlockingIOError, OSError):
                dropped += 1  # the device's queue is full: a drop, as on a real link
    print(f"COUNTS forwarded={forwarded} dropped={dropped}", flush=True)


if __name__ == "__main__":
    main()
