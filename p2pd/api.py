"""The control API as typed Python: one method per JSON-RPC method of docs/CONTROL_API.md.

The control server (p2pd/control.py) parses each request's parameters and calls the
method of the same name here; the tests call these methods directly on an in-process
node. The results are TypedDicts: they *are* the JSON objects the control API sends (no
conversion to drift from the contract), and mypy checks each one where it is built.
The summaries of single objects are defined next to their objects (``MessageSummary``,
``ContactSummary``, ``EvidenceSummary`` in p2pd/messaging.py, ``CallSummary`` in
p2pd/calls.py, ``PeerSummary`` in p2pd/lan_announcement.py); the rest are here.

This module reads the node's services through their public methods only, and imports
p2pd.daemon for its types only: daemon imports this module and the control server,
neither of them imports daemon.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import trio

from . import __version__
from .calls import CallSummary
from .dht.mailbox_pass_share import PassRevoked, revoke_pass
from .errors import Contested, LocalError, NotFound, UsageError
from .files import FileSummary
from .identity import HandleRef, fingerprint, format_fingerprint, self_certifying
from .invite import Invite, add_contact
from .lan_announcement import PeerSummary
from .messaging import Contact, ContactSummary, EvidenceSummary, IncomingSummary, MessageSummary
from .records import HandleRecord
from .session import safety_number
from .wire import MESSAGE_ID_LEN

if TYPE_CHECKING:
    from .daemon import Node
    from .files import FilesService

__all__ = [
    "Api",
    "CallMedia",
    "ContactAdded",
    "ContactRow",
    "ContestedHandle",
    "Inbox",
    "InboxMessage",
    "MailboxCheck",
    "RecordSummary",
    "Sent",
    "Status",
    "Verification",
    "Whois",
]


class Status(TypedDict):
    version: str
    handle: str
    self_certifying: str
    fingerprint: str
    fingerprint_display: str
    listen: str
    addresses: list[str]
    node_id: str
    routing_table_size: int
    records_stored: int
    record_seq: int | None
    record_expires: int | None
    replicas: int
    uptime: float
    dht_counters: dict[str, int]
    refused_records: Any
    udp_counters: dict[str, int]
    quic_counters: dict[str, int]
    quic_connections: int
    #: Delivery's counters, ``outbox_pending`` and ``events_dropped``.
    messages: dict[str, Any]
    lan_mode: str
    lan_peers: int
    #: LanDiscovery.statistics(): refusals (``not_a_contact``, ``refused``), the tag-scan
    #: budget's counters; empty when LAN discovery is off.
    lan_counters: dict[str, int]
    #: Issue 13 (docs/CONTROL_API.md, "status"): "reachable", "unreachable", "unknown".
    reachability: str
    #: "none", "endpoint-independent", "endpoint-dependent", "unknown".
    nat_mapping: str
    #: [{"address": "ip:port", "observers": n}], most seen first.
    reflexive_addresses: list[dict[str, Any]]
    public_address: str | None
    #: "server", or "client" (not reachable: kept out of other nodes' routing tables).
    dht_mode: str
    #: The files service's counters (p2pd/files/; docs/CONTROL_API.md, "Files").
    files: dict[str, int]
    #: Issue 13, item 8: "everyone" or "contacts" (the record lists no direct address).
    privacy_addresses: str
    #: Our direct addresses, published or not (what `p2pd invite` prints).
    direct_addresses: list[str]
    #: Address hints received, refused, sent (p2pd/address_hints.py).
    hint_counters: dict[str, int]
    #: Relays that hold a registration for us (listed in our record), "ip:port".
    relays_in_use: list[str]
    #: Relays.statistics(): ``relaying`` (our relay's registrations, circuits, bytes and
    #: counters), ``client`` (our registrations' states, circuits, counters).
    relay: dict[str, Any]
    #: Relayed connections upgraded by hole punching (p2pd/relay/upgrade.py): started,
    #: direct, failed, refused; and probes refused by the punch core.
    hole_punching: dict[str, int]
    #: Our mapping at the default gateway (p2pd/transport/portmap_driver.py):
    #: ``enabled``, ``gateway``, ``protocol`` ("pcp"/"nat-pmp"), ``mapped_address``,
    #: ``expires_in`` (s), ``failure``, ``counters``.
    port_mapping: dict[str, Any]
    #: The UDP port's counters: ``queues`` (2: QUIC has a receive queue of its own),
    #: ``datagrams_in``, ``dropped_unknown``, ``send_dropped``, ``send_errors``,
    #: ``other_read_paused``, ``kernel_dropped_quic`` / ``_other`` (full queues).
    udp: dict[str, int]


class RecordSummary(TypedDict):
    handle: str
    self_certifying: str
    public_key: str
    fingerprint: str
    fingerprint_display: str
    addresses: list[str]
    #: Relays that hold a registration for the owner (p2pd/relay/), "ip:port".
    relays: list[str]
    seq: int
    issued: int
    expires: int


class Whois(RecordSummary):
    status: Literal["ok"]
    #: "current" while the record says its node is up, else "stale".
    presence: str


class ContestedHandle(TypedDict):
    """Different keys claim the handle (p2pd/claims.py): none is chosen."""

    status: Literal["contested"]
    handle: str
    message: str
    claims: list[dict[str, Any]] | None


class Sent(TypedDict):
    messages: list[MessageSummary]


class InboxMessage(IncomingSummary):
    #: Pass the largest one seen as ``after`` to read only what came since.
    cursor: int


class Inbox(TypedDict):
    messages: list[InboxMessage]
    cursor: int


class ContactRow(ContactSummary):
    """A contact: its pin, and every suspected key (evidence, never used)."""

    suspected_keys: list[EvidenceSummary]


class ContactListRow(ContactRow):
    session: bool
    pending: int
    #: Where the contact's invite or the contact itself said it is (tried first).
    address_hints: list[str]


class ContactAdded(ContactRow):
    #: False: the handle was pinned to that key already (its hints are refreshed).
    added: bool
    address_hints: list[str]


class Verification(ContactRow):
    fingerprint_display: str
    safety_number: str
    own_fingerprint: str
    previous_fingerprint: str | None


class MailboxCheck(TypedDict):
    new_messages: int


@dataclass(frozen=True)
class CallMedia:
    """What a call sends and records: ``audio_in``/``video_in`` sources, a ``record``
    path (absolute), a ``duration`` in seconds (None: until someone hangs up), and
    ``audio_out``, the speaker to play to (None or ``none``: no device)."""

    audio_in: str | None = None
    video_in: str | None = None
    record: str | None = None
    duration: float | None = None
    audio_out: str | None = None


def record_summary(record: HandleRecord) -> RecordSummary:
    return {
        "handle": record.handle,
        "self_certifying": self_certifying(record.handle, record.public_key),
        "public_key": record.public_key.hex(),
        "fingerprint": record.fingerprint,
        "fingerprint_display": format_fingerprint(record.fingerprint),
        "addresses": [str(a) for a in record.addresses],
        "relays": [str(a) for a in record.relays],
        "seq": record.seq,
        "issued": record.issued,
        "expires": record.expires,
    }


class Api:
    """The control API's methods on a running node. Raises what the control API maps to
    its error codes: UsageError (bad parameters), NotFound, Contested, other P2PDError."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._delivery = node.delivery
        self._calls = node.calls

    # ------------------------------------------------------------------ the node

    def status(self) -> Status:
        node = self._node
        stats = node.dht.statistics()
        identity, record = node.identity, node.record
        reach = node.dht.reachability().as_dict()
        return {
            "version": __version__,
            "handle": identity.handle,
            "self_certifying": self_certifying(identity.handle, identity.public_key),
            "fingerprint": identity.fingerprint,
            "fingerprint_display": format_fingerprint(identity.fingerprint),
            "listen": str(node.listen_address),
            "addresses": [str(a) for a in (record.addresses if record else ())],
            "node_id": stats["node_id"],
            "routing_table_size": stats["routing_table_size"],
            "records_stored": stats["records_stored"],
            "record_seq": record.seq if record else None,
            "record_expires": record.expires if record else None,
            "replicas": node.replicas,
            "uptime": round(time.time() - node.started, 3),
            "dht_counters": stats["counters"],
            "refused_records": stats["refused_records"],
            "udp_counters": dict(node.endpoint.stats),
            "quic_counters": dict(node.quic.stats),
            "quic_connections": len(node.quic.peers()),
            "messages": self._delivery.statistics(),
            "lan_mode": node.config.lan.mode,
            "lan_peers": len(node.lan.peers()) if node.lan is not None else 0,
            "lan_counters": node.lan.statistics() if node.lan is not None else {},
            "reachability": reach["reachability"],
            "nat_mapping": reach["mapping"],
            "reflexive_addresses": reach["reflexive_addresses"],
            "public_address": reach["public_address"],
            "dht_mode": reach["dht_mode"],
            "files": node.files.statistics() if node.files is not None else {},
            "privacy_addresses": "contacts" if node.config.hides_addresses else "everyone",
            "direct_addresses": [str(a) for a in node.advertised_addresses()],
            "hint_counters": dict(node.hints.stats),
            "relays_in_use": [str(a) for a in node.published_relays()],
            "relay": node.relays.statistics() if node.relays is not None else {},
            "hole_punching": node.upgrade.statistics() if node.upgrade is not None else {},
            "port_mapping": (
                node.portmap.statistics() if node.portmap is not None else {"enabled": False}
            ),
            "udp": {
                **node.endpoint.stats,
                **{f"kernel_dropped_{k}": v for k, v in node.endpoint.kernel_drops().items()},
            },
        }

    async def whois(self, handle: str) -> Whois | ContestedHandle:
        """What the DHT says of ``handle`` (``handle#prefix`` filters rival claims).
        Another key than a pin's is kept as evidence. Raises NotFound."""
        node, ref = self._node, HandleRef.parse(handle)
        if ref.handle == node.identity.handle and ref.matches(node.identity.public_key):
            if node.record is None:
                raise NotFound("our own record is not published yet")
            record = node.record
        else:
            try:
                record = await node.dht.resolve(ref)
            except Contested as exc:
                return {
                    "status": "contested",
                    "handle": ref.handle,
                    "message": exc.message,
                    "claims": exc.claims,
                }
        # another key than a pin is evidence (issue 11, item 5)
        self._delivery.contacts.observe(
            record.handle, record.public_key, time.time(), source="dht", place="whois"
        )
        presence = "current" if record.present(time.time()) else "stale"
        return {"status": "ok", "presence": presence, **record_summary(record)}

    def peers(self) -> list[PeerSummary]:
        """Nearby peers (LAN), then contacts whose records we resolved (DHT)."""
        lan = self._node.lan
        out = [p.summary() for p in (lan.peers() if lan is not None else [])]
        seen = {p["fingerprint"] for p in out}
        for record in self._delivery.resolved_records():
            if record.fingerprint in seen:
                continue
            out.append(
                {
                    "handle": record.handle,
                    "fingerprint": record.fingerprint,
                    "addresses": [str(a) for a in record.addresses],
                    "via": "dht",
                    "last_seen": None,
                    "pinned": self._delivery.contacts.by_key(record.public_key) is not None,
                    "verified": True,
                    "mode": None,
                }
            )
        return out

    # ------------------------------------------------------------------ messages

    async def send(self, handle: str, text: str) -> MessageSummary:
        """Queue ``text`` for ``handle``; durable on return (state ``queued``)."""
        return (await self._delivery.send(handle, text)).summary()

    async def send_many(self, handle: str, texts: Sequence[str]) -> Sent:
        """Queue each of ``texts`` as a message of its own, in order, all or none."""
        messages = await self._delivery.send_many(handle, texts)
        return {"messages": [m.summary() for m in messages]}

    def message(self, msg_id: str) -> MessageSummary:
        """One message by its id (32 hex digits). Raises NotFound."""
        try:
            raw = bytes.fromhex(msg_id)
        except ValueError:
            raise UsageError("a message id is 32 hex digits") from None
        message = self._delivery.messages.get(raw) if len(raw) == MESSAGE_ID_LEN else None
        if message is None:
            raise NotFound(f"no message {msg_id[:40]!r}")
        return message.summary()

    def inbox(self, *, sender: str | None = None, after: int = 0, limit: int = 1000) -> Inbox:
        """Received messages after the cursor ``after``, oldest first; only those from
        ``sender``'s pinned key if given."""
        peer_key = None
        if sender is not None:
            contact = self._delivery.contacts.get(HandleRef.parse(sender).handle)
            if contact is None:
                return {"messages": [], "cursor": after}
            peer_key = contact.public_key
        rows = self._delivery.messages.inbox(peer_key=peer_key, after_rowid=after, limit=limit)
        messages: list[InboxMessage] = [
            {**self._delivery.incoming_summary(message), "cursor": rowid} for rowid, message in rows
        ]
        return {"messages": messages, "cursor": max([after, *(rowid for rowid, _ in rows)])}

    def outbox(self, *, limit: int = 1000) -> list[MessageSummary]:
        """Sent messages, newest first, in every state."""
        return [m.summary() for m in self._delivery.messages.outbox(limit=limit)]

    async def check_mailbox(self) -> MailboxCheck:
        return {"new_messages": await self._delivery.check_mailbox()}

    async def revoke_mailbox_pass(self) -> PassRevoked:
        """A contact leaked our mailbox pass: move every contact to a new one."""
        node = self._node
        if node.mailbox_passes is None:
            raise UsageError("mailbox passes are not running")
        identity = node.identity
        return await revoke_pass(
            node.mailbox_passes, identity.public_key, identity.sign, time.time(),
            node.dht.mailbox_revoke,
        )  # fmt: skip

    # ------------------------------------------------------------------ contacts

    def contacts(self) -> list[ContactListRow]:
        out: list[ContactListRow] = []
        for contact in self._delivery.contacts.all():
            out.append(
                {
                    **self._contact_row(contact),
                    "session": self._delivery.sessions.has_session(contact.public_key),
                    "pending": len(self._delivery.messages.pending_for(contact.public_key)),
                    "address_hints": [str(a) for a in self._node.hints.get(contact.public_key)],
                }
            )
        return out

    async def add_contact(self, invite: str) -> ContactAdded:
        """Pin an invite's handle to its key (fetched from the DHT, checked against the
        invite's fingerprint) and keep its addresses as hints. Raises InvalidInvite,
        KeyChanged (pinned to another key: never re-pinned here), NotFound."""
        node = self._node
        parsed = Invite.parse(invite)
        if parsed.handle == node.identity.handle:
            raise UsageError("that is your own handle")
        contact, added = await add_contact(
            parsed, contacts=self._delivery.contacts, hints=node.hints,
            resolve=node.dht.resolve, bootstrap=node.dht.bootstrap,
        )  # fmt: skip
        hinted = [str(a) for a in node.hints.get(contact.public_key)]
        return {**self._contact_row(contact), "added": added, "address_hints": hinted}

    async def verify(
        self, handle: str, *, accept: bool = False, accept_new: str | None = None
    ) -> Verification:
        """The safety number with ``handle``'s pinned key (pinned now if never seen).
        ``accept``: mark the pin verified. ``accept_new``: pin the suspected key that
        fingerprint names instead (verified), and send what waits for the handle to it."""
        contact, previous = await self._delivery.verify_pin(
            HandleRef.parse(handle), accept=accept, accept_new=accept_new
        )
        own = self._node.identity
        number = await trio.to_thread.run_sync(safety_number, own.public_key, contact.public_key)
        return {
            **self._contact_row(contact),
            "fingerprint_display": format_fingerprint(fingerprint(contact.public_key)),
            "safety_number": number,
            "own_fingerprint": own.fingerprint,
            "previous_fingerprint": None if previous is None else fingerprint(previous),
        }

    def _contact_row(self, contact: Contact) -> ContactRow:
        evidence = self._delivery.contacts.evidence(contact.handle)
        return {**contact.summary(), "suspected_keys": [e.summary() for e in evidence]}

    # ------------------------------------------------------------------ calls

    async def call(self, handle: str, media: CallMedia | None = None) -> CallSummary:
        """Ring ``handle``; returns once the call is answered, refused or given up."""
        media = media or CallMedia()
        placed = await self._calls.call(
            handle, audio_in=media.audio_in, video_in=media.video_in, record=media.record,
            duration=media.duration, audio_out=media.audio_out,
        )  # fmt: skip
        return placed.summary()

    async def answer(self, *, wait: float = 0.0, media: CallMedia | None = None) -> CallSummary:
        """Answer the ringing call, or wait up to ``wait`` seconds for one."""
        media = media or CallMedia()
        answered = await self._calls.answer(
            wait=wait, audio_in=media.audio_in, video_in=media.video_in, record=media.record,
            duration=media.duration, audio_out=media.audio_out,
        )  # fmt: skip
        return answered.summary()

    async def hangup(self) -> CallSummary:
        """End the current call, or reject the one ringing."""
        return (await self._calls.hangup()).summary()

    def calls(self) -> list[CallSummary]:
        """The current call and recent ones, newest first."""
        return self._calls.calls()

    # ------------------------------------------------------------------ files

    @property
    def _files(self) -> FilesService:
        if self._node.files is None:
            raise LocalError("this daemon has no files service")
        return self._node.files

    async def send_file(self, handle: str, path: str) -> FileSummary:
        """Offer the file at ``path`` (absolute, on the daemon's machine) to ``handle``."""
        return await self._files.send_file(handle, path)

    def files(self) -> list[FileSummary]:
        """Incoming and outgoing transfers, newest first."""
        return self._files.transfers()

    def file(self, transfer_id: str) -> FileSummary:
        """One transfer, by its id or a unique prefix (at least 4 hex digits)."""
        files = self._files
        return files.summary(files.find(transfer_id))

    async def accept_file(self, transfer_id: str, directory: str | None = None) -> FileSummary:
        return await self._files.accept(transfer_id, directory)

    async def reject_file(self, transfer_id: str) -> FileSummary:
        return await self._files.reject(transfer_id)

    async def cancel_file(self, transfer_id: str) -> FileSummary:
        return await self._files.cancel(transfer_id)
