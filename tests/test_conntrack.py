"""The ctnetlink messages of p2pd/testing/conntrack.py (the testbed's NAT flush), as
bytes: what the kernel is sent, and how its answers are read. The flush itself runs
in a router's namespace in tests/test_nat_cells.py."""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from p2pd.testing.conntrack import ConntrackError, flush_request, parse_ack


def test_a_flush_is_one_ctnetlink_delete_with_no_attributes() -> None:
    data = flush_request(socket.AF_INET, sequence=7)
    length, kind, flags, seq, port = struct.unpack_from("=IHHII", data)
    assert length == len(data) == 16 + 4  # nlmsghdr + nfgenmsg, nothing else
    assert kind == (1 << 8) | 2  # NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_DELETE
    assert flags == 0x01 | 0x04 and (seq, port) == (7, 0)  # NLM_F_REQUEST | NLM_F_ACK
    assert data[16:] == bytes([socket.AF_INET, 0, 0, 0])  # family, version 0, res_id 0


def _answer(code: int, seq: int = 1, kind: int = 2) -> bytes:
    return struct.pack("=IHHII", 36, kind, 0, seq, 0) + struct.pack("=i", code) + bytes(16)


def test_the_kernel_answer_is_read_as_an_errno() -> None:
    assert parse_ack(_answer(0)) == 0
    assert parse_ack(_answer(-errno.EPERM)) == errno.EPERM
    for bad in (b"", _answer(0)[:18], _answer(0, seq=2), _answer(0, kind=3)):
        with pytest.raises(ConntrackError):
            parse_ack(bad)
