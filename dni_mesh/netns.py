"""Every host of a topology as a Linux network namespace on this machine (`--hosts netns`).

One machine then stands in for several: each host has its own network stack and the address the
topology gives it, nodes on different hosts talk real TCP over veth pairs and a bridge instead of
loopback, and the kernel shapes the bandwidth between hosts with `tc tbf`. Delay and jitter stay
in user space (`dni_mesh.link`): this kernel has no netem.

Layout of run R = "dni-<launcher pid>" (interface names are only unique inside our namespaces):
- R-net: bridge br0 with one veth port per host (h0, h1, ...) and one towards the launcher (ctl).
- R-HOST: lo, and eth0 with the host's address/24. Its egress has one tbf per host it sends to
  over a shaped link, at that link's rate (`link.host_pair_rates`), under an htb that sorts
  packets by destination; everything else (control traffic, ARP) goes out unshaped.
- The launcher's own namespace gets one veth, `dni<pid>c`, with the last free address of the /24,
  so its control inbox and its Stop messages reach every host. The hosts have no default route:
  their traffic cannot leave the subnet.

Teardown deletes that veth, then the namespaces (each veth dies with its peer). It runs after the
`with` block whatever ended it (a node's crash, SIGINT, SIGTERM, an error in setup), with those
signals ignored until it is done. Names carry the launcher's pid, so a later run removes what a
launcher killed with SIGKILL left behind.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass

from dni_mesh.link import host_pair_rates
from dni_mesh.topology import Topology

PREFIX_LEN = 24
_NETNS = re.compile(r"dni-(\d+)-.+")  # a run's namespaces: dni-<pid>-net, dni-<pid>-<host>
_ROOT_VETH = re.compile(r"dni(\d+)c")  # a run's veth in the launcher's namespace


class NetnsError(RuntimeError):
    """The namespaces cannot be set up: not root, no `ip`, or addresses that do not fit."""


@dataclass(frozen=True)
class Plan:
    """Names and addresses of one run's namespaces, worked out before anything is created."""

    pid: int  # the launcher's: every name of the run carries it
    subnet: ipaddress.IPv4Network
    addresses: dict[str, ipaddress.IPv4Address]  # host -> its address
    control: ipaddress.IPv4Address  # the launcher's address
    rates: dict[frozenset[str], float]  # host pair -> Mbit/s the kernel shapes between them

    @property
    def bridge(self) -> str:
        return f"dni-{self.pid}-net"

    @property
    def root_veth(self) -> str:
        return f"dni{self.pid}c"

    def namespace(self, host: str) -> str:
        return f"dni-{self.pid}-{host}"

    def namespaces(self) -> list[str]:
        return [self.namespace(host) for host in self.addresses] + [self.bridge]


def plan(topology: Topology, pid: int) -> Plan:
    """Check that the hosts' addresses suit namespaces: distinct private IPv4 in one /24."""
    addresses = {}
    for name, host in topology.hosts.items():
        try:
            address = ipaddress.IPv4Address(host.address)
        except ValueError:
            raise NetnsError(f"host {name!r}: address {host.address!r} is not an IPv4 address "
                             "(each namespace gets the address the topology names)") from None
        if not address.is_private or address.is_loopback or address.is_link_local:
            raise NetnsError(f"host {name!r}: {address} is not a private, non-loopback address "
                             "(use a test subnet such as 10.77.0.0/24)")
        addresses[name] = address
    first = next(iter(addresses.values()))
    subnet = ipaddress.IPv4Network(f"{first}/{PREFIX_LEN}", strict=False)
    for name, address in addresses.items():
        if address not in subnet or address in (subnet.network_address, subnet.broadcast_address):
            raise NetnsError(f"host {name!r}: {address} is not a host address of {subnet}, the "
                             f"/{PREFIX_LEN} of the first host (all hosts share one subnet)")
    if len(set(addresses.values())) < len(addresses):
        raise NetnsError("--hosts netns needs a distinct address for every host")
    control = next(a for a in reversed(list(subnet.hosts())) if a not in addresses.values())
    rates = host_pair_rates(topology)
    return Plan(pid, subnet, addresses, control, rates)


def _run(*command: str) -> str:
    """Run an iproute2 command; its stdout, or NetnsError with its stderr."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise NetnsError(f"`{' '.join(command)}` failed: {result.stderr.strip()}")
    return result.stdout


def _ip(*args: str) -> str:
    return _run("ip", *args)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def namespaces() -> list[str]:
    """Names of the network namespaces that `ip netns` lists."""
    return [entry["name"] for entry in json.loads(_ip("-j", "netns", "list") or "[]")]


def root_links() -> list[str]:
    """Names of the network interfaces of this process's namespace."""
    return [entry["ifname"] for entry in json.loads(_ip("-j", "link", "show") or "[]")]


def leftovers(pid: int | None = None) -> list[str]:
    """The namespaces and root veth of the run of launcher `pid`; without a pid, those of every
    run whose launcher is dead."""
    def wanted(match: re.Match | None) -> bool:
        if match is None:
            return False
        return int(match[1]) == pid if pid is not None else not _alive(int(match[1]))

    return ([name for name in namespaces() if wanted(_NETNS.fullmatch(name))]
            + [name for name in root_links() if wanted(_ROOT_VETH.fullmatch(name))])


def remove(names: list[str]) -> None:
    """Delete these root veths and namespaces (veths first: their peers go with them)."""
    existing = set(namespaces())
    for name in sorted(names, key=lambda n: n in existing):
        what = ("netns", "del") if name in existing else ("link", "del")
        subprocess.run(["ip", *what, name], capture_output=True, timeout=30)


def require_namespaces() -> None:
    """NetnsError unless this process may create namespaces with `ip` and `tc`."""
    if os.geteuid() != 0:
        raise NetnsError("--hosts netns needs root (it creates network namespaces, veth links "
                         "and tc qdiscs); run it with sudo, or use --hosts local")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise NetnsError(f"--hosts netns needs `{tool}` (iproute2) on the PATH")
    _ip("netns", "list")


class Network:
    """The namespaces of one run, as a context manager: created on enter, always removed on exit."""

    def __init__(self, topology: Topology, pid: int | None = None):
        self.topology = topology
        self.plan = plan(topology, os.getpid() if pid is None else pid)
        self._sigterm = None

    @property
    def control_host(self) -> str:
        """The address the launcher binds its control inbox on."""
        return str(self.plan.control)

    def wrap(self, node: str, command: list[str]) -> list[str]:
        """A node's command, run in its host's namespace with the kernel shaping bandwidth."""
        host = self.topology.nodes[node].host
        return ["ip", "netns", "exec", self.plan.namespace(host), *command, "--kernel-bandwidth"]

    def __enter__(self) -> Network:
        require_namespaces()
        self._sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            remove(leftovers())
            self._check_subnet_is_free()
            self._create()
        except BaseException:
            self._teardown()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._teardown()

    def _check_subnet_is_free(self) -> None:
        """Refuse a subnet this machine already routes: traffic must stay in our namespaces."""
        for route in json.loads(_ip("-j", "-4", "route", "show") or "[]"):
            if route["dst"] != "default" and ipaddress.IPv4Network(
                    route["dst"], strict=False).overlaps(self.plan.subnet):
                raise NetnsError(f"subnet {self.plan.subnet} of the hosts overlaps {route['dst']} "
                                 f"on {route.get('dev', '?')} of this machine (another run, or a "
                                 "real network): give the hosts addresses in a free subnet")

    def _create(self) -> None:
        p, bridge = self.plan, self.plan.bridge
        _ip("netns", "add", bridge)
        _ip("-n", bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge, "link", "set", "br0", "up")
        for i, (host, address) in enumerate(p.addresses.items()):
            ns = p.namespace(host)
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", bridge, "link", "add", f"h{i}", "type", "veth",
                "peer", "name", "eth0", "netns", ns)
            _ip("-n", bridge, "link", "set", f"h{i}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{address}/{PREFIX_LEN}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            self._shape(host)
        _ip("link", "add", p.root_veth, "type", "veth", "peer", "name", "ctl", "netns", bridge)
        _ip("-n", bridge, "link", "set", "ctl", "master", "br0", "up")
        _ip("addr", "add", f"{p.control}/{PREFIX_LEN}", "dev", p.root_veth)
        _ip("link", "set", p.root_veth, "up")

    def _shape(self, host: str) -> None:
        """A tbf per host this one sends to over a shaped link; other traffic is not shaped.

        htb only sorts packets by destination into classes (this kernel has no prio qdisc): a
        class's own rate is far above any link's, so its tbf does the shaping.
        """
        p, tc = self.plan, ("tc", "-n", self.plan.namespace(host))
        targets = [(other, rate) for pair, rate in p.rates.items() if host in pair
                   for other in pair - {host}]
        if not targets:
            return
        _run(*tc, "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb")  # unsorted: direct
        for i, (other, mbps) in enumerate(targets, start=1):
            _run(*tc, "class", "add", "dev", "eth0", "parent", "1:", "classid", f"1:{i}", "htb",
                 "rate", "100gbit", "quantum", "60000")
            _run(*tc, "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio", "1",
                 "u32", "match", "ip", "dst", f"{p.addresses[other]}/32", "flowid", f"1:{i}")
            burst = max(32 * 1024, round(mbps * 1e6 / 8 / 200))  # 5 ms at the rate, at least 32 KiB
            _run(*tc, "qdisc", "add", "dev", "eth0", "parent", f"1:{i}", "tbf",
                 "rate", f"{round(mbps * 1e6)}bit", "burst", str(burst), "latency", "100ms")

    def _teardown(self) -> None:
        """Remove everything of this run; SIGINT and SIGTERM wait until it is done."""
        handlers = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            remove([self.plan.root_veth, *self.plan.namespaces()])
        finally:
            if self._sigterm is not None:
                handlers[signal.SIGTERM] = self._sigterm
            for s, handler in handlers.items():
                signal.signal(s, handler)
