"""Network namespace labs for the tests that need several "hosts" (root and iproute2 only).

Every address of a lab lives in namespaces the lab creates, under names with a random tag, and
deletes at the end (deleting a namespace deletes its links): nothing is put on the machine's
own interfaces. Each namespace has interfaces and routes of its own, so two labs at once (two
xdist workers, two test runs side by side) can use the same subnets without seeing each other,
and nothing leaves the links a lab creates (docs/libp2p.md L51). Commands run in a namespace
under `lab.prefix(name)` (`ip netns exec ...`), `pigeon` processes with `netns=lab.ns[name]`
(tests/forkserver.py); they still share the file system, so the test talks to them through
their data directories as usual.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid

__all__ = ["CAN_MAKE_NAMESPACES", "CAN_NAT", "NatLab", "Netlab", "StarLab", "TriangleLab"]

CAN_MAKE_NAMESPACES = os.geteuid() == 0 and shutil.which("ip") is not None
CAN_NAT = CAN_MAKE_NAMESPACES and shutil.which("nft") is not None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class Netlab:
    """Namespaces named after `names`, each with loopback up; subclasses link them in `build`.
    Use as a context manager: a failed build tears down what was made."""

    def __init__(self, *names: str) -> None:
        self.tag = uuid.uuid4().hex[:5]
        self.ns = {n: f"pg{n}-{self.tag}" for n in names}

    def __enter__(self) -> Netlab:
        try:
            for ns in self.ns.values():
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            self.build()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in self.ns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)

    def build(self) -> None:
        """Links, addresses and routes (none in the base lab)."""

    def prefix(self, name: str) -> tuple[str, ...]:
        """The command prefix that runs a program in namespace `name`."""
        return ("ip", "netns", "exec", self.ns[name])

    def run(self, name: str, *command: str) -> None:
        """Run `command` in namespace `name`; raises when it fails."""
        subprocess.run([*self.prefix(name), *command], check=True, capture_output=True,
                       timeout=10)

    def iface(self, name: str, end: str) -> str:
        """The interface of link `name` at end `end` ("l" left, "r" right); at most 15
        characters, as Linux requires."""
        return f"{name}{end}{self.tag}"

    def link(self, left: str, left_ip: str, right: str, right_ip: str, name: str) -> None:
        """A veth pair between namespaces `left` and `right`, with a /24 address at each end."""
        a, b = self.iface(name, "l"), self.iface(name, "r")
        _ip("link", "add", a, "netns", self.ns[left], "type", "veth", "peer", "name", b,
            "netns", self.ns[right])
        for ns, ifname, addr in ((left, a, left_ip), (right, b, right_ip)):
            _ip("-n", self.ns[ns], "addr", "add", f"{addr}/24", "dev", ifname)
            _ip("-n", self.ns[ns], "link", "set", ifname, "up")

    def set_link(self, ns: str, ifname: str, state: str) -> None:
        """Take interface `ifname` of namespace `ns` "up" or "down"."""
        _ip("-n", self.ns[ns], "link", "set", ifname, state)


class StarLab(Netlab):
    """A hub and two spokes a and b, each linked to the hub only; the hub does not forward, so
    a and b cannot reach each other, and each reaches the hub at its own link's address:

        a (10.197.1.2) -- hub (10.197.1.1 | 10.197.2.1) -- b (10.197.2.2)
    """

    def __init__(self) -> None:
        super().__init__("hub", "a", "b")
        self.hub_ip = {"a": "10.197.1.1", "b": "10.197.2.1"}
        self.ns_ip = {"a": "10.197.1.2", "b": "10.197.2.2"}

    def build(self) -> None:
        for side in ("a", "b"):
            self.link("hub", self.hub_ip[side], side, self.ns_ip[side], f"h{side}")


class TriangleLab(Netlab):
    """A hub and namespaces a and b, each linked to the hub (each has a host route to the hub's
    other address too, so both reach a service on the hub at either address, as at a public
    one), and a direct veth pair between a and b. No route leads from one namespace to the
    other's hub link, so the direct pair is the only path between a and b:

        a (10.199.1.2) -- hub (10.199.1.1 | 10.199.2.1) -- b (10.199.2.2)
        a (10.199.3.1) ------------ direct ------------- b (10.199.3.2)
    """

    def __init__(self) -> None:
        super().__init__("hub", "a", "b")
        self.hub_ip = {"a": "10.199.1.1", "b": "10.199.2.1"}
        self.ns_ip = {"a": "10.199.1.2", "b": "10.199.2.2"}
        self.direct_ip = {"a": "10.199.3.1", "b": "10.199.3.2"}

    def build(self) -> None:
        for side in ("a", "b"):
            self.link("hub", self.hub_ip[side], side, self.ns_ip[side], f"h{side}")
        for side, other in (("a", "b"), ("b", "a")):
            _ip("-n", self.ns[side], "route", "add", f"{self.hub_ip[other]}/32", "via",
                self.hub_ip[side])
        self.link("a", self.direct_ip["a"], "b", self.direct_ip["b"], "d")

    def cut(self) -> None:
        """Take the direct link down on b's side: a's end only loses its carrier, keeps its
        address and route, and what it sends vanishes without an error, as in a partition
        (nothing resets its connection; only a deadline can notice)."""
        self.set_link("b", self.iface("d", "r"), "down")

    def heal(self) -> None:
        self.set_link("b", self.iface("d", "r"), "up")


class NatLab(Netlab):
    """An "internet" namespace, and for each device a router namespace doing source NAT
    (nftables masquerade) in front of a device namespace:

        da (10.202.1.2) -- ra [masquerade as 10.201.1.2] -- inet (10.201.1.1 | 10.201.2.1)
        db (10.202.2.2) -- rb [masquerade as 10.201.2.2] --/

    The internet forwards between the routers' public addresses; nothing routes to the private
    ones, so a device is reachable only through a NAT mapping it opened itself. Linux
    masquerade keeps the source port when it can (an endpoint-independent mapping), and the
    router drops unsolicited packets (address- and port-dependent filtering). Needs nftables
    (`CAN_NAT`)."""

    def __init__(self) -> None:
        super().__init__("inet", "ra", "rb", "da", "db")
        self.public = {"a": "10.201.1.2", "b": "10.201.2.2"}
        self.inet_ip = {"a": "10.201.1.1", "b": "10.201.2.1"}
        self.private = {"a": "10.202.1.2", "b": "10.202.2.2"}
        self.gateway = {"a": "10.202.1.1", "b": "10.202.2.1"}

    def build(self) -> None:
        self.run("inet", "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for side in ("a", "b"):
            router, device = f"r{side}", f"d{side}"
            self.link("inet", self.inet_ip[side], router, self.public[side], f"p{side}")
            self.link(router, self.gateway[side], device, self.private[side], f"q{side}")
            _ip("-n", self.ns[router], "route", "add", "default", "via", self.inet_ip[side])
            _ip("-n", self.ns[device], "route", "add", "default", "via", self.gateway[side])
            self.run(router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            public_if = self.iface(f"p{side}", "r")
            self.run(router, "nft", f"add table ip nat; add chain ip nat post {{ type nat hook "
                     f"postrouting priority 100 ; }}; add rule ip nat post oifname {public_if} "
                     "masquerade")
            # Like a home router, drop what arrives unasked instead of answering it with a
            # reset from the router's own stack: a hole-punch SYN that comes before ours must
            # not kill the attempt.
            self.run(router, "nft", "add table ip filter; add chain ip filter input { type "
                     "filter hook input priority 0 ; policy accept ; }; add rule ip filter "
                     f"input iifname {public_if} ct state established,related accept; add rule "
                     f"ip filter input iifname {public_if} drop")
