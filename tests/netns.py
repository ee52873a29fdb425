"""A small virtual network of Linux network namespaces for multi-host tests (no Docker; root / CAP_NET_ADMIN).

`NetnsLab(prefix, hosts)` makes one namespace per host plus a "switch" namespace holding a Linux bridge; each host
gets one veth whose other end is a port of that bridge, so the hosts talk over a real (virtual) Ethernet segment
with ARP, separate routing tables and separate loopbacks. Nothing is created in the caller's namespace: veths are
made directly inside the namespaces and every sysctl is per namespace.

Addresses: the lab first tries a loopback-range subnet (127.77.0.0/24). Linux treats 127/8 as "martian" off the
loopback device unless `net.ipv4.conf.*.route_localnet = 1`, which is set inside each host's namespace only; and
each namespace's `lo` is narrowed from 127.0.0.1/8 to 127.0.0.1/32, otherwise the local route for 127.0.0.0/8
would swallow the neighbours' 127.77.0.x addresses. A TCP probe between two hosts checks the result; where the
kernel does not route it, the lab falls back to the private subnet 10.77.0.0/24 (`lab.loopback_range` says which
one is in use).

Code runs "on" a host with `lab.call(host, fn, ...)`: `fn` runs in a fresh thread that has entered the host's
network namespace (setns(2) changes only the calling thread), so sockets it opens live there, and every child
process it starts (`subprocess`, `ManagedProcess`, Flower's own children after them) inherits that namespace.
The product's own SuperLink / SuperNode / FlowerCli classes are thus used unchanged. `lab.close()` kills every
process still inside a lab namespace (found through /proc/<pid>/ns/net, so nothing else is ever touched) and
deletes the namespaces, which destroys their veths and the bridge.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
SUBNETS = ("127.77.0", "10.77.0")  # loopback range first, then the private fallback
PROBE_PORT = 7


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not Linux, no `ip`, no CAP_NET_ADMIN...)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed (exit {done.returncode}): {done.stderr.strip()}")
    return done


def _libc_setns() -> Callable[[int, int], int]:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.setns


def netns_inode(pid: int | str) -> int:
    """Inode of the network namespace of a process ("self" for this thread's process)."""
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def probe_netns_support(name: str) -> str | None:
    """None when `ip netns add` works here; otherwise the reason it does not (the probe namespace is removed)."""
    if not Path("/proc/self/ns/net").exists():
        return "no /proc/self/ns/net: not Linux, or no network namespaces"
    try:
        done = _ip("netns", "add", name, check=False)
    except FileNotFoundError:
        return "the `ip` tool (iproute2) is not installed"
    except subprocess.TimeoutExpired:
        return "`ip netns add` hung"
    if done.returncode != 0:
        return f"`ip netns add` failed (needs root / CAP_NET_ADMIN): {done.stderr.strip()}"
    _ip("netns", "delete", name, check=False)
    try:
        _libc_setns()
    except (OSError, AttributeError):
        return "libc has no setns()"
    return None


class NetnsLab:
    """Hosts (one network namespace each) on one bridged segment; see the module docstring."""

    def __init__(self, prefix: str, hosts: Sequence[str], host_numbers: dict[str, int] | None = None):
        if len(prefix) > 10:
            raise ValueError("prefix too long for interface names")
        self.prefix = prefix
        self.hosts = list(hosts)
        self.numbers = host_numbers or {h: i + 1 for i, h in enumerate(self.hosts)}
        self.switch = f"{prefix}-sw"
        self.subnet = ""
        self.loopback_range = False
        self.notes: list[str] = []
        self._made: list[str] = []
        self._setns = _libc_setns()

    # ------------------------------------------------------------------ names and addresses
    def ns(self, host: str) -> str:
        """The namespace name of a host."""
        return f"{self.prefix}-{host}"

    def ip(self, host: str) -> str:
        """The host's address on the segment."""
        return f"{self.subnet}.{self.numbers[host]}"

    def inode(self, host: str) -> int:
        return os.stat(NETNS_DIR / self.ns(host)).st_ino

    def host_of_pid(self, pid: int) -> str | None:
        """Which lab host a process runs on (None: not in the lab)."""
        try:
            ino = netns_inode(pid)
        except OSError:
            return None
        return next((h for h in self.hosts if self.inode(h) == ino), None)

    # ------------------------------------------------------------------ building and tearing down
    def open(self) -> "NetnsLab":
        try:
            for name in [self.switch, *map(self.ns, self.hosts)]:
                _ip("netns", "add", name)
                self._made.append(name)
            sw = self.switch
            _ip("-n", sw, "link", "set", "lo", "up")
            _ip("-n", sw, "link", "add", "br0", "type", "bridge")
            _ip("-n", sw, "link", "set", "br0", "up")
            for host in self.hosts:
                ns = self.ns(host)
                _ip("-n", ns, "link", "set", "lo", "up")
                self._sysctl(
                    ns,
                    "net.ipv4.conf.all.route_localnet=1",
                    "net.ipv4.conf.default.route_localnet=1",
                    "net.ipv4.conf.lo.route_localnet=1",
                )
                # 127.0.0.1/8 on lo would make every 127.x.y.z local: keep only 127.0.0.1 itself
                _ip("-n", ns, "addr", "del", "127.0.0.1/8", "dev", "lo", check=False)
                _ip("-n", ns, "addr", "replace", "127.0.0.1/32", "dev", "lo")
                _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p-{host}"[:15], "netns", sw)
                self._sysctl(ns, "net.ipv4.conf.eth0.route_localnet=1")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", sw, "link", "set", f"p-{host}"[:15], "master", "br0", "up")
            for subnet in SUBNETS:
                self._address(subnet)
                problem = self._probe()
                if problem is None:
                    break
                self.notes.append(f"{subnet}.0/24 does not carry TCP between namespaces ({problem})")
                for host in self.hosts:
                    _ip("-n", self.ns(host), "addr", "flush", "dev", "eth0")
            else:
                raise RuntimeError("no test subnet works between the namespaces: " + "; ".join(self.notes))
            self.loopback_range = self.subnet.startswith("127.")
            return self
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _sysctl(ns: str, *settings: str) -> None:
        done = subprocess.run(
            ["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *settings], capture_output=True, text=True, timeout=30
        )
        if done.returncode != 0:
            raise RuntimeError(f"sysctl {settings} in {ns} failed: {done.stderr.strip()}")

    def _address(self, subnet: str) -> None:
        self.subnet = subnet
        for host in self.hosts:
            _ip("-n", self.ns(host), "addr", "add", f"{self.ip(host)}/24", "dev", "eth0")

    def _probe(self) -> str | None:
        """A TCP connection from the second host to the first; None when it works."""
        if len(self.hosts) < 2:
            return None
        a, b = self.hosts[0], self.hosts[1]
        ready, result = threading.Event(), {}

        def listen() -> None:
            with socket.socket() as srv:
                srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                srv.bind((self.ip(a), PROBE_PORT))
                srv.listen(1)
                srv.settimeout(10)
                ready.set()
                try:
                    conn, peer = srv.accept()
                    conn.close()
                    result["peer"] = peer[0]
                except OSError as exc:
                    result["error"] = str(exc)

        listener = threading.Thread(target=lambda: self.call(a, listen), daemon=True)
        listener.start()
        if not ready.wait(10):
            return "the probe listener did not start"
        try:
            self.call(b, lambda: socket.create_connection((self.ip(a), PROBE_PORT), timeout=5).close())
        except OSError as exc:
            return f"connect: {exc}"
        finally:
            listener.join(15)
        return None if result.get("peer") == self.ip(b) else f"accept: {result}"

    def pids(self) -> list[int]:
        """Every process whose network namespace is one of the lab's."""
        inodes = set()
        for name in self._made:
            try:
                inodes.add(os.stat(NETNS_DIR / name).st_ino)
            except OSError:
                continue
        out = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if netns_inode(entry.name) in inodes:
                        out.append(int(entry.name))
                except OSError:
                    continue
        return out

    def kill_all(self, grace: float = 10.0) -> list[int]:
        """TERM, then KILL, every process left in the lab's namespaces; the pids found."""
        found = self.pids()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.2)
            if not self.pids():
                break
        return found

    def close(self) -> None:
        """Kill what runs inside, delete every namespace made (their veths and the bridge go with them)."""
        try:
            self.kill_all()
        finally:
            for name in reversed(self._made):
                _ip("netns", "delete", name, check=False)
            self._made = [n for n in self._made if (NETNS_DIR / n).exists()]

    def leftovers(self) -> list[str]:
        """Namespaces of this lab still present (empty after a clean close)."""
        listed = _ip("netns", "list", check=False).stdout.split()
        return [n for n in listed if n.startswith(f"{self.prefix}-")]

    # ------------------------------------------------------------------ running code on a host
    def call(self, host: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in a thread inside the host's network namespace; its result (or exception)."""
        out: dict[str, Any] = {}

        def body() -> None:
            try:
                fd = os.open(NETNS_DIR / self.ns(host), os.O_RDONLY)
                try:
                    if self._setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns into {self.ns(host)}: {os.strerror(err)}")
                finally:
                    os.close(fd)
                out["value"] = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                out["error"] = exc

        thread = threading.Thread(target=body, name=f"netns-{host}", daemon=True)
        thread.start()
        thread.join()
        if "error" in out:
            raise out["error"]
        return out["value"]

    def port_open(self, host: str, address: str, port: int) -> bool:
        """Whether `host` can open a TCP connection to address:port."""

        def probe() -> bool:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(2.0)
                return s.connect_ex((address, port)) == 0

        return self.call(host, probe)
