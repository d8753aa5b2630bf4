"""Flush a network namespace's conntrack table through netlink, the way a router that
reboots or times out every mapping at once would (issue 13, item 5).

There is no ``conntrack`` tool on the test machines, so this speaks ctnetlink itself
(linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h): one ``IPCTNL_MSG_CT_DELETE``
message of the ``NFNL_SUBSYS_CTNETLINK`` subsystem with no attributes deletes every
entry of the family named in its ``nfgenmsg`` (``ctnetlink_flush_conntrack`` in
net/netfilter/nf_conntrack_netlink.c), in the namespace of the socket. Every NAT
mapping of a masquerading router is a conntrack entry, so the next packet out of the
inside gets a new mapping: a new random port behind ``masquerade random``, and for a
port-preserving ``masquerade`` the same port unless something holds it.

Run it inside the router's namespace: ``ip netns exec NS python -m
p2pd.testing.conntrack flush`` (what :meth:`p2pd.testing.netns.NatRouter.flush_conntrack`
does); it prints how many entries the table held before and after, read from
``/proc/net/nf_conntrack`` of the same namespace. Needs CAP_NET_ADMIN there.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
import sys

#: linux/netlink.h
NETLINK_NETFILTER = 12
NLM_F_REQUEST = 0x01
NLM_F_ACK = 0x04
NLMSG_ERROR = 0x02
#: linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_DELETE = 2
NFNETLINK_V0 = 0

_NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
_NFGENMSG = struct.Struct("=BBH")  # family, version, resource id (big-endian; 0 here)


class ConntrackError(OSError):
    """The kernel refused the flush (its errno), or answered something unreadable."""


def flush_request(family: int = socket.AF_INET, sequence: int = 1) -> bytes:
    """The netlink message that deletes every conntrack entry of ``family``."""
    body = _NFGENMSG.pack(family, NFNETLINK_V0, 0)
    kind = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
    flags = NLM_F_REQUEST | NLM_F_ACK
    header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, sequence, 0)
    return header + body


def parse_ack(data: bytes, sequence: int = 1) -> int:
    """The errno of the kernel's NLMSG_ERROR answer to ``sequence`` (0: done)."""
    if len(data) < _NLMSGHDR.size + 4:
        raise ConntrackError(errno.EPROTO, f"short netlink answer ({len(data)} bytes)")
    _, kind, _, seq, _ = _NLMSGHDR.unpack_from(data)
    if kind != NLMSG_ERROR or seq != sequence:
        raise ConntrackError(errno.EPROTO, f"unexpected netlink answer type {kind} seq {seq}")
    (code,) = struct.unpack_from("=i", data, _NLMSGHDR.size)
    return -int(code)


def flush(family: int = socket.AF_INET, timeout: float = 5.0) -> None:
    """Delete every conntrack entry of ``family`` in this process's network namespace."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sock:
        sock.settimeout(timeout)
        sock.bind((0, 0))
        sock.send(flush_request(family))
        code = parse_ack(sock.recv(65536))
    # ENOENT: the table held no entry of that family, which is flushed as well.
    if code not in (0, errno.ENOENT):
        raise ConntrackError(code, f"conntrack flush refused: {os.strerror(code)}")


def count(path: str = "/proc/net/nf_conntrack") -> int:
    """How many conntrack entries this namespace holds now."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def main(argv: list[str]) -> int:
    if argv != ["flush"]:
        print("usage: python -m p2pd.testing.conntrack flush", file=sys.stderr)
        return 2
    before = count()
    for family in (socket.AF_INET, socket.AF_INET6):
        flush(family)
    print(json.dumps({"before": before, "after": count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
