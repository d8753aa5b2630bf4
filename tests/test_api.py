"""The typed façade (p2pd/api.py) on real in-process nodes, and the control server's
table that serves it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
from test_delivery import node, root  # noqa: F401  (root is a fixture)

from p2pd import control
from p2pd.api import Api
from p2pd.calls import CallError
from p2pd.errors import NotFound, UsageError
from p2pd.identity import Identity
from p2pd.testing.waiting import wait_for

#: The methods of docs/CONTROL_API.md but ``subscribe`` (served apart: an event stream).
METHODS = {
    "status", "whois", "send", "message", "inbox", "outbox", "contacts", "verify", "add_contact",
    "check_mailbox", "revoke_mailbox_pass", "peers", "call", "answer", "hangup", "calls",
    "send_file", "files", "file", "accept_file", "reject_file", "cancel_file",
}  # fmt: skip


def test_the_control_server_serves_every_method_of_the_facade() -> None:
    assert set(control.HANDLERS) == METHODS
    assert all(callable(getattr(Api, name)) for name in METHODS - {"send"})


async def test_the_facade_on_two_nodes(root: Path) -> None:  # noqa: F811
    alice_id, bob_id = Identity.generate("alice"), Identity.generate("bob")
    with trio.fail_after(60):
        async with (
            node(root, alice_id) as alice,
            node(root, bob_id, bootstrap=(alice.listen_address,)) as bob,
        ):
            api, bobs = Api(alice), Api(bob)
            status = api.status()
            assert status["handle"] == "alice" and status["fingerprint"] == alice_id.fingerprint
            assert status["record_seq"] == alice.record.seq  # type: ignore[union-attr]
            assert status["lan_mode"] == "off" and status["lan_peers"] == 0
            found = await api.whois("bob")
            assert found["status"] == "ok" and found["fingerprint"] == bob_id.fingerprint
            assert (await api.whois("alice"))["handle"] == "alice"  # our own record
            with pytest.raises(NotFound):
                await api.whois("nobody")

            sent = await api.send("bob", "hello")
            assert sent["state"] == "queued" and sent["handle"] == "bob"
            assert [m["text"] for m in (await api.send_many("bob", ["a", "b"]))["messages"]] == [
                "a",
                "b",
            ]
            await wait_for(lambda: len(bobs.inbox()["messages"]) == 3)
            # every ack back (not only the first batch's), and bob's check of alice's key
            # in the DHT done: both come a little after the texts are in bob's inbox
            await wait_for(lambda: {m["state"] for m in api.outbox()} == {"delivered"})
            await wait_for(lambda: all(m["sender_verified"] for m in bobs.inbox()["messages"]))
            assert sorted(m["text"] for m in api.outbox()) == ["a", "b", "hello"]
            assert len(api.outbox(limit=2)) == 2
            with pytest.raises(UsageError):
                api.message("not hex")
            inbox = bobs.inbox(sender="alice", after=0, limit=2)
            assert [m["text"] for m in inbox["messages"]] == ["hello", "a"]
            assert inbox["cursor"] == inbox["messages"][-1]["cursor"]
            assert all(m["sender_verified"] and m["from"].startswith("alice#") for m in
                       inbox["messages"])  # fmt: skip
            assert bobs.inbox(after=inbox["cursor"])["messages"][0]["text"] == "b"
            assert bobs.inbox(sender="carol") == {"messages": [], "cursor": 0}

            (row,) = api.contacts()
            assert row["handle"] == "bob" and row["session"] and row["pending"] == 0
            checked = await api.verify("bob", accept=True)
            assert checked["verified"] and checked["own_fingerprint"] == alice_id.fingerprint
            assert checked["safety_number"] == (await bobs.verify("alice"))["safety_number"]
            (peer,) = api.peers()
            assert peer["via"] == "dht" and peer["fingerprint"] == bob_id.fingerprint
            assert (await api.check_mailbox()) == {"new_messages": 0}
            assert api.calls() == []
            with pytest.raises(CallError):
                await api.hangup()

            # what the control server sends is the façade's result, as JSON
            handlers = control.methods(api)
            for name, params in (("contacts", None), ("inbox", {"limit": 5}), ("peers", [])):
                served = await handlers[name](params)
                assert json.loads(json.dumps(served)) == served
            assert await handlers["contacts"](None) == api.contacts()
