"""An idle daemon's session layer leaves x3dh and pydantic unloaded (issue 9).

The daemon opens its SessionManager at start, publishes ``prekey_bundle()`` and runs
``maintain()`` every upkeep; none of these needs the X3DH library when there is nothing
to rotate or top up: they read the public fields stored beside the secret state
(p2pd/session/public_prekeys.py). These tests check that in a fresh interpreter (so
that no other test's imports count), that the first agreement afterwards still works
with the bundle that was published, that a corrupt public field is refused, and that a
document written before those fields still loads.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from p2pd.at_rest import CLEAR, AtRest
from p2pd.errors import SessionStateCorrupt
from p2pd.identity import Identity
from p2pd.session import PrekeyBundle, SessionConfig, SessionManager
from p2pd.session.config import DAY
from p2pd.session.manager import PREKEYS_META_KEY
from p2pd.session.public_prekeys import PublicPrekeys
from p2pd.store import open_database

T0 = 1_700_000_000.0
KEY = bytes(range(32))
HEAVY = ("x3dh", "pydantic", "doubleratchet", "p2pd.session.crypto", "p2pd.session.prekeys")

# Runs in a fresh interpreter: what a daemon's start and idle upkeep do to the sessions
# of an existing store, the modules loaded then, and then a first message in and out.
CHILD = """
import json, sys
from pathlib import Path
from p2pd.at_rest import AtRest
from p2pd.identity import Identity
from p2pd.session import SessionManager
from p2pd.store import open_database

args = json.load(sys.stdin)
identity = Identity.from_seed("bob", bytes.fromhex(args["seed"]))
at_rest = AtRest(bytes.fromhex(args["key"]) if args["key"] else None)
heavy = args["heavy"]
conn = open_database(Path(args["path"]))
now = args["now"]
sessions = SessionManager.open(conn, identity, now=now, at_rest=at_rest)
published = sessions.prekey_bundle()
changed = sessions.maintain(now + 3600)  # the daemon's upkeep, nothing due
idle = [m for m in heavy if m in sys.modules]
full = sessions._load_prekeys().bundle.encode()  # the full state, parsed
loaded = [m for m in heavy if m in sys.modules]
first = sessions.decrypt(bytes.fromhex(args["envelope"]), now=now + 3600)
reply = sessions.encrypt(first.peer_key, b"and back", now=now + 3600)
started = sessions.encrypt(
    bytes.fromhex(args["carol"]), b"hello carol", now=now + 3600,
    peer_bundle=bytes.fromhex(args["carol_bundle"]),
)
print(json.dumps({
    "idle": idle, "loaded": loaded, "changed": changed,
    "published": published.hex(), "full": full.hex(),
    "plaintext": first.plaintext.hex(), "reply": reply.hex(), "started": started.hex(),
}))
"""


def open_node(path: Path | None, identity: Identity, at_rest: AtRest = CLEAR) -> SessionManager:
    return SessionManager.open(open_database(path), identity, now=T0, at_rest=at_rest)


def stored_document(sessions: SessionManager) -> dict[str, Any]:
    (value,) = sessions._conn.execute(
        "SELECT value FROM meta WHERE key=?", (PREKEYS_META_KEY,)
    ).fetchone()
    document: dict[str, Any] = json.loads(
        sessions.at_rest.open_text("meta", "value", PREKEYS_META_KEY, value)
    )
    return document


def store_document(sessions: SessionManager, document: dict[str, Any]) -> None:
    text = json.dumps(document, separators=(",", ":"))
    value = sessions.at_rest.seal_text("meta", "value", PREKEYS_META_KEY, text)
    with sessions._conn:
        sessions._conn.execute("UPDATE meta SET value=? WHERE key=?", (value, PREKEYS_META_KEY))


@pytest.mark.parametrize("key", [None, KEY], ids=["clear", "sealed"])
def test_an_idle_daemons_sessions_leave_x3dh_and_pydantic_unloaded(
    tmp_path: Path, key: bytes | None
) -> None:
    bob_id, alice_id, carol_id = (Identity.generate(h) for h in ("bob", "alice", "carol"))
    path = tmp_path / "bob.db"
    bob = open_node(path, bob_id, AtRest(key))  # bob's first start: his prekeys are made
    bundle = bob.prekey_bundle()
    bob._conn.close()
    alice = open_node(None, alice_id)
    envelope = alice.encrypt(bob_id.public_key, b"hello bob", now=T0, peer_bundle=bundle)
    carol = open_node(None, carol_id)
    args = {
        "seed": bob_id.seed.hex(),
        "key": key.hex() if key else "",
        "heavy": HEAVY,
        "path": str(path),
        "now": T0 + DAY,
        "envelope": envelope.hex(),
        "carol": carol_id.public_key.hex(),
        "carol_bundle": carol.prekey_bundle().hex(),
    }
    child = subprocess.run(
        [sys.executable, "-c", CHILD],
        input=json.dumps(args),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout)
    assert out["idle"] == []  # started, published, kept up: no X3DH, no pydantic
    assert out["changed"] is False
    assert set(out["loaded"]) >= {"x3dh", "pydantic"}  # the check above can fail
    # what the idle daemon published is what the full state gives, byte for byte
    assert out["published"] == out["full"] == bundle.hex()
    # and the first agreements after the lazy load work, both ways
    assert bytes.fromhex(out["plaintext"]) == b"hello bob"
    reply = alice.decrypt(bytes.fromhex(out["reply"]), now=T0 + DAY)
    assert reply == (bob_id.public_key, b"and back")
    assert carol.decrypt(bytes.fromhex(out["started"]), now=T0 + DAY).plaintext == b"hello carol"


@pytest.mark.parametrize("grace", [3, 10])
def test_maintenance_is_due_exactly_when_maintain_would_change_something(grace: int) -> None:
    """PublicPrekeys.maintenance_due (read without x3dh) against what OwnPrekeys.maintain
    does to the stored document, over rotations, retirements, grace ends and top-ups.
    A grace shorter than the rotation period ends the old signed prekey's on its own, a
    longer one (not a multiple) a retired key's."""
    config = SessionConfig(
        signed_prekey_rotation=7 * DAY, signed_prekey_grace=grace * DAY, one_time_prekeys=20
    )
    more = dataclasses.replace(config, one_time_prekeys=22)  # a top-up due at once
    bob_id = Identity.generate("bob")
    bob = SessionManager.open(open_database(None), bob_id, now=T0, config=config)
    alice = open_node(None, Identity.generate("alice"))
    seen = {True: 0, False: 0}
    for step in range(80):
        now = T0 + step * DAY / 2
        if step % 9 == 4:  # a one-time prekey used: a top-up is due (not in maintain)
            envelope = alice.encrypt(
                bob_id.public_key, b"x", now=now, peer_bundle=bob.prekey_bundle()
            )
            bob.decrypt(envelope, now=now)
            alice.reset_session(bob_id.public_key, now=now)
        for later, settings in ((now, config), (now + DAY / 4, config), (now, more)):
            text = json.dumps(stored_document(bob))
            public = PublicPrekeys.parse(text, bob_id.public_key)
            due = public.maintenance_due(later, settings)
            prekeys = public.full(bob_id)
            prekeys.maintain(later, settings)
            changed = comparable(prekeys.dump()) != comparable(text)
            assert due == changed, (step, later)
            seen[due] += 1
        bob.maintain(now)
    assert seen[True] >= 90 and seen[False] >= 40, seen  # both cases were exercised


def comparable(text: str) -> dict[str, Any]:
    """A stored document, its one-time prekeys (a set, in x3dh's JSON a list) sorted."""
    document: dict[str, Any] = json.loads(text)
    document["x3dh"]["pre_keys"] = sorted(document["x3dh"]["pre_keys"])
    return document


def corrupt(document: dict[str, Any], how: str, other: dict[str, Any]) -> None:
    public = document["public"]
    if how == "bundle signature":
        bundle = bytearray(bytes.fromhex(public["bundle"]))
        bundle[40] ^= 1
        public["bundle"] = bundle.hex()
    elif how == "another key's bundle":
        public["bundle"] = other["public"]["bundle"]
    elif how == "bundle not canonical":
        public["bundle"] += "00"
    elif how == "held without the signed prekey":
        public["held_signed_prekeys"] = other["public"]["held_signed_prekeys"]
    elif how == "held not sorted":
        public["held_signed_prekeys"] = public["held_signed_prekeys"] * 2
    elif how == "held too many":
        spk = PrekeyBundle.decode(bytes.fromhex(public["bundle"])).signed_prekey
        public["held_signed_prekeys"] = sorted([spk.hex(), "11" * 32, "22" * 32, "33" * 32])
    elif how == "created not a number":
        document["signed_prekey_created"] = "1700000000"
    elif how == "created not finite":
        document["signed_prekey_created"] = float("nan")
    elif how == "retired not a list":
        document["retired_signed_prekeys"] = {}
    elif how == "public not an object":
        document["public"] = []
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how",
    [
        "bundle signature",
        "another key's bundle",
        "bundle not canonical",
        "held without the signed prekey",
        "held not sorted",
        "held too many",
        "created not a number",
        "created not finite",
        "retired not a list",
        "public not an object",
    ],
)
def test_a_corrupt_public_field_is_refused_at_start(tmp_path: Path, how: str) -> None:
    bob_id = Identity.generate("bob")
    bob = open_node(tmp_path / "bob.db", bob_id)
    other = stored_document(open_node(None, Identity.generate("other")))
    document = stored_document(bob)
    corrupt(document, how, other)
    store_document(bob, document)
    with pytest.raises(SessionStateCorrupt, match="does not load"):
        open_node(tmp_path / "bob.db", bob_id)


def test_public_fields_that_disagree_with_the_keys_are_refused_at_the_first_full_load(
    tmp_path: Path,
) -> None:
    """An older bundle of ours is well-formed and signed by us: only the full state can
    tell that it is not what the keys give. The first agreement, or a due maintenance,
    then fails with the same SessionStateCorrupt, and changes nothing."""
    bob_id = Identity.generate("bob")
    bob = open_node(tmp_path / "bob.db", bob_id)
    old = stored_document(bob)["public"]
    alice = open_node(None, Identity.generate("alice"))
    envelope = alice.encrypt(bob_id.public_key, b"x", now=T0, peer_bundle=bob.prekey_bundle())
    bob.decrypt(envelope, now=T0)  # a one-time prekey used and replaced
    document = stored_document(bob)
    assert document["public"] != old
    document["public"] = old
    store_document(bob, document)
    bob = open_node(tmp_path / "bob.db", bob_id)  # the cheap checks pass
    before = stored_document(bob)
    carol = open_node(None, Identity.generate("carol"))
    first = carol.encrypt(bob_id.public_key, b"y", now=T0, peer_bundle=bytes.fromhex(old["bundle"]))
    with pytest.raises(SessionStateCorrupt, match="does not match its keys"):
        bob.decrypt(first, now=T0)
    with pytest.raises(SessionStateCorrupt, match="does not match its keys"):
        bob.maintain(T0 + 8 * DAY)  # a rotation is due
    assert stored_document(bob) == before


def test_a_document_without_the_public_fields_loads_and_gains_them(tmp_path: Path) -> None:
    """What the code before the public fields wrote: parsed fully once at the start, and
    stored again with them; the bundle does not change."""
    bob_id = Identity.generate("bob")
    bob = open_node(tmp_path / "bob.db", bob_id, AtRest(KEY))
    bundle = bob.prekey_bundle()
    document = stored_document(bob)
    public = document.pop("public")
    store_document(bob, document)
    bob = open_node(tmp_path / "bob.db", bob_id, AtRest(KEY))
    assert stored_document(bob)["public"] == public
    assert bob.prekey_bundle() == bundle
    alice = open_node(None, Identity.generate("alice"))
    envelope = alice.encrypt(bob_id.public_key, b"still", now=T0, peer_bundle=bundle)
    assert bob.decrypt(envelope, now=T0).plaintext == b"still"


# In a fresh interpreter: what a daemon's first start reads of a home `p2pd init` made.
FIRST_START = """
import json, sys
from pathlib import Path
from p2pd.at_rest import open_at_rest
from p2pd.keystore import unlock
from p2pd.session import PrekeyBundle, SessionManager
from p2pd.store import db_path, open_database

args = json.load(sys.stdin)
home = Path(args["home"])
made = db_path(home).exists()
unlocked = unlock(home, args["passphrase"].encode())
conn = open_database(db_path(home))
at_rest = open_at_rest(conn, unlocked.storage_key)
sessions = SessionManager.open(conn, unlocked.identity, now=args["now"], at_rest=at_rest)
bundle = sessions.prekey_bundle()
print(json.dumps({
    "made": made,
    "loaded": [m for m in args["heavy"] if m in sys.modules],
    "signed": PrekeyBundle.decode(bundle).verify(unlocked.identity.public_key),
    "bundle_changed": sessions.bundle_changed,
}))
"""


def test_init_makes_the_prekeys_so_a_new_daemon_starts_as_light_as_a_restarted_one(
    tmp_path: Path,
) -> None:
    """`p2pd init` makes the X3DH prekeys (sealed under the passphrase's storage key), so
    a daemon's first start reads only their public side: without this, the first start
    made them and kept x3dh and pydantic loaded (62.5 MB idle against 53.5 restarted)."""
    import time

    from p2pd.testing.daemons import run_cli

    home = tmp_path / "alice"
    passphrase = "correct horse battery staple"
    init = run_cli(home, "init", "alice", env={"P2PD_PASSPHRASE": passphrase})
    assert init.returncode == 0, init.stderr
    args = {"home": str(home), "passphrase": passphrase, "now": time.time(), "heavy": HEAVY}
    child = subprocess.run(
        [sys.executable, "-c", FIRST_START],
        input=json.dumps(args), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr
    seen = json.loads(child.stdout)
    assert seen == {"made": True, "loaded": [], "signed": True, "bundle_changed": False}, seen
    # sealed at rest: the stored prekey state is not readable JSON without the key
    conn = open_database(home / "p2pd.db")
    (value,) = conn.execute("SELECT value FROM meta WHERE key=?", (PREKEYS_META_KEY,)).fetchone()
    conn.close()
    assert b'"x3dh"' not in (value if isinstance(value, bytes) else value.encode())
