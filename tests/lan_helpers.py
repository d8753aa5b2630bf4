"""Identities, constants and record builders shared by the LAN discovery tests
(tests/test_lan_announcement.py, tests/test_discovery.py). Imports only the pure core."""

from __future__ import annotations

import base64
from collections.abc import Callable

from p2pd.identity import Identity
from p2pd.lan_announcement import build_txt, encode_txt
from p2pd.wire import Address

NOW = 1_760_000_000
PORT = 4747
HOSTS = ["192.0.2.10", "2001:db8::10"]
SOURCES = [Address(h, PORT) for h in HOSTS]
NONCE = bytes(range(16))

ALICE = Identity.from_seed("alice", b"\x01" * 32)
BOB = Identity.from_seed("bob_b", b"\x02" * 32)
MALLORY = Identity.from_seed("mallory", b"\x03" * 32)


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def no_pins(handle: str) -> bytes | None:
    return None


def pins_of(*identities: Identity) -> Callable[[str], bytes | None]:
    table = {i.handle: i.public_key for i in identities}
    return table.get


def contacts_of(*identities: Identity) -> dict[bytes, str]:
    return {i.public_key: i.handle for i in identities}


def txt(
    identity: Identity = ALICE, *, mode: str = "everyone", now: int = NOW, **kw: object
) -> bytes:
    nonce = NONCE if mode == "contacts" else None
    props = build_txt(identity, port=PORT, addresses=HOSTS, mode=mode, now=now, nonce=nonce)  # type: ignore[arg-type]
    return encode_txt(props)
