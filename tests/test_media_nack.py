"""NACK retransmission of lost video fragments (p2pd/media/nack.py, the NACK wire format,
the assembler's side of it), by hand: a sender's fragments, a history, a receiver's
assembler, datagrams moved (or dropped) between them with ``now`` advanced by hand."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2pd.errors import UsageError
from p2pd.media.assembler import AssembledFrame, AssemblerConfig, FrameAssembler
from p2pd.media.nack import NackConfig, NackScheduler, RetransmitConfig, RetransmitHistory
from p2pd.media.wire import (
    MAX_NACK_ENTRIES,
    NACK_WHOLE_FRAME,
    MediaWireError,
    NackEntry,
    ReceiverReport,
    VideoFragment,
    VideoNack,
    decode,
    fragment,
)

# --------------------------------------------------------------------------- wire


def test_nack_round_trips_and_packs_fragments_as_pid_and_bitmask() -> None:
    nack = VideoNack.from_missing([(7, 3), (7, 1), (7, 18), (7, 19), (9, NACK_WHOLE_FRAME)])
    # 1 and 3 share an entry (3 = 1 + 1 + bit 1); 18 is 17 past 1: a new entry, 19 joins it.
    assert nack.entries == (
        NackEntry(7, 1, 0b10),
        NackEntry(7, 18, 0b1),
        NackEntry(9, NACK_WHOLE_FRAME),
    )
    data = nack.encode()
    assert len(data) == 2 + 8 * 3 and data[:2] == bytes([0x16, 3])
    assert decode(data) == nack
    assert [e.fragments() for e in nack.entries] == [[1, 3], [18, 19], []]


@pytest.mark.parametrize(
    "data",
    [
        bytes([0x16]),  # no count
        bytes([0x16, 0]),  # no entries
        bytes([0x16, 0]) + bytes(8),  # count 0 with an entry
        bytes([0x16, 2]) + bytes(8),  # count 2, one entry
        bytes([0x16, 1]) + bytes(9),  # a byte too many
        bytes([0x16, 65]) + bytes(8 * 65),  # over MAX_NACK_ENTRIES
        bytes([0x16, 1]) + (1).to_bytes(4, "big") + (1024).to_bytes(2, "big") + bytes(2),
        bytes([0x16, 1]) + (1).to_bytes(4, "big") + (1020).to_bytes(2, "big") + b"\x00\x08",
        bytes([0x16, 1]) + (1).to_bytes(4, "big") + b"\xff\xff\x00\x01",  # whole + mask
    ],
)
def test_malformed_nacks_are_refused(data: bytes) -> None:
    with pytest.raises(MediaWireError):
        decode(data)


def test_nacks_that_do_not_fit_are_our_mistake() -> None:
    with pytest.raises(UsageError):
        VideoNack(()).encode()
    with pytest.raises(UsageError):
        VideoNack(tuple(NackEntry(i, 0) for i in range(MAX_NACK_ENTRIES + 1))).encode()
    with pytest.raises(UsageError):
        VideoNack((NackEntry(0, 1023, 1),)).encode()  # names fragment 1024


def test_the_report_says_whether_its_sender_answers_nacks() -> None:
    for answers in (False, True):
        report = decode(ReceiverReport(1, answers_nacks=answers).encode())
        assert isinstance(report, ReceiverReport) and report.answers_nacks is answers
    # An older receiver's report (flag bit 1 clear) keeps NACKs off.
    assert not ReceiverReport(1, accepts_redundancy=True).answers_nacks


# --------------------------------------------------------------------------- a link by hand


class Link:
    """A sender (its fragments and history) and a receiver (an assembler with NACKs on)."""

    def __init__(self, *, nack: NackConfig | None = None, budget: float = 1.0) -> None:
        self.history = RetransmitHistory(RetransmitConfig(budget_fraction=budget))
        self.asm = FrameAssembler(AssemblerConfig(nack=nack or NackConfig()))
        self.asm.nack_enabled = True
        self.played: list[AssembledFrame] = []

    def send(self, fid: int, size: int, now: float, *, key: bool = False) -> list[bytes]:
        """Frame ``fid`` as the sender puts it on the wire (into the history too)."""
        out = []
        for piece in fragment(fid, fid * 3000, bytes([fid % 256]) * size, keyframe=key,
                              max_datagram=114):  # fmt: skip
            data = piece.encode()
            self.history.sent(piece, data, now)
            out.append(data)
        return out

    def receive(self, datagrams: list[bytes], now: float) -> None:
        for data in datagrams:
            message = decode(data)
            assert isinstance(message, VideoFragment)
            self.played += self.asm.push(message, now)

    def nack(self, now: float) -> VideoNack | None:
        self.played += self.asm.poll(now)
        nack = self.asm.nack_request(now)
        return None if nack is None else _wire(nack)

    def ids(self) -> list[int]:
        return [f.frame_id for f in self.played]


def _wire(nack: VideoNack) -> VideoNack:
    """Through the bytes and back, as the peer would see it."""
    again = decode(nack.encode())
    assert isinstance(again, VideoNack)
    return again


def start(link: Link) -> None:
    """A keyframe (frame 0) through whole at t = 0."""
    link.receive(link.send(0, 500, 0.0, key=True), 0.0)
    assert link.ids() == [0]


def test_a_lost_fragment_is_nacked_once_resent_once_and_the_frame_plays() -> None:
    link = Link()
    start(link)
    frame1 = link.send(1, 300, 0.033)  # 3 fragments of 100 bytes
    assert len(frame1) == 3
    link.receive([frame1[0], frame1[2]], 0.034)  # fragment 1 lost
    assert link.nack(0.035) is None  # not yet: it may be reordered
    nack = link.nack(0.046)
    assert nack is not None and nack.entries == (NackEntry(1, 1),)
    assert link.nack(0.047) is None  # asked once; the retry waits
    resent = link.history.nacked(nack, 0.047)
    assert resent == [frame1[1]]  # the very datagram, once
    link.receive(resent, 0.047)
    assert link.ids() == [0, 1]
    assert link.asm.keyframe_request(0.05) is None  # no keyframe needed
    assert link.nack(0.2) is None  # nothing missing: no more NACKs
    stats = link.asm.statistics()
    assert stats["nacks_sent"] == 1 and stats["nack_recovered"] == 1
    assert stats["losses"] == 0
    assert link.history.statistics()["video_retransmitted"] == 1


def test_a_lost_retransmission_is_asked_for_again_then_given_up() -> None:
    link = Link(nack=NackConfig(reorder_delay=0.01, retry_interval=0.03, max_nacks=2))
    start(link)
    frame1 = link.send(1, 300, 0.033)
    link.receive(frame1[1:], 0.034)  # fragment 0 lost
    assert link.nack(0.034) is None  # noticed (CallMedia asks after every fragment)
    first = link.nack(0.05)
    assert first is not None and first.entries == (NackEntry(1, 0),)
    link.history.nacked(first, 0.05)  # resent, and lost again
    assert link.nack(0.07) is None  # within retry_interval
    second = link.nack(0.081)
    assert second == first  # asked again, once more
    assert link.nack(0.2) is None  # max_nacks: no third
    link.receive(link.history.nacked(second, 0.081), 0.082)
    assert link.ids() == [0, 1]


def test_trailing_fragments_are_nacked_once_a_later_frame_arrives() -> None:
    link = Link()
    start(link)
    frame1 = link.send(1, 300, 0.033)
    link.receive(frame1[:1], 0.034)  # fragments 1 and 2 not here (yet?)
    assert link.nack(0.06) is None  # the rest of the frame may still be coming
    link.receive(link.send(2, 100, 0.066), 0.067)
    assert link.nack(0.068) is None  # noticed now: reorder_delay first
    nack = link.nack(0.08)
    assert nack is not None and [e.fragments() for e in nack.entries] == [[1, 2]]
    link.receive(link.history.nacked(nack, 0.08), 0.081)
    assert link.ids() == [0, 1, 2]


def test_a_frame_lost_whole_is_nacked_whole_and_resent_whole() -> None:
    link = Link()
    start(link)
    frame1 = link.send(1, 300, 0.033)  # all lost
    link.receive(link.send(2, 100, 0.066), 0.067)
    assert link.nack(0.067) is None
    nack = link.nack(0.08)
    assert nack is not None and nack.entries == (NackEntry(1, NACK_WHOLE_FRAME),)
    resent = link.history.nacked(nack, 0.08)
    assert resent == frame1
    link.receive(resent, 0.081)
    assert link.ids() == [0, 1, 2]


def test_a_late_retransmission_is_ignored_after_the_deadline() -> None:
    link = Link(nack=NackConfig(deadline=0.1))
    start(link)
    frame1 = link.send(1, 300, 0.033)
    link.receive(frame1[1:], 0.034)
    assert link.nack(0.034) is None
    nack = link.nack(0.05)
    assert nack is not None
    link.receive(link.send(2, 100, 0.066), 0.067)  # complete, behind the missing frame 1
    assert link.nack(0.15) is not None  # the second try, still within the deadline
    assert link.ids() == [0]
    assert link.nack(0.17) is None and link.ids() == [0]  # 103 ms: given up on frame 1
    assert link.asm.waiting_for_keyframe
    assert link.asm.keyframe_request(0.17) == 1  # the fallback
    link.receive(link.send(3, 400, 0.2, key=True), 0.2)
    assert link.ids() == [0, 3]
    before = link.asm.statistics()
    link.receive(link.history.nacked(nack, 0.21), 0.21)  # the retransmission, too late
    after = link.asm.statistics()
    assert link.ids() == [0, 3]
    assert after["late"] == before["late"] + 1
    assert after["losses"] == before["losses"] == 1


def test_the_deadline_is_what_the_nack_attempts_take_at_the_rtt() -> None:
    scheduler = NackScheduler()
    assert scheduler.deadline(None) == pytest.approx(0.1)  # floor: 3 tries 30 ms apart
    # 10 ms + a 20 ms tick + 2 retries of 1.5 RTT + 10 ms + the last RTT + 10 ms.
    assert scheduler.deadline(0.05) == pytest.approx(0.26)
    assert scheduler.deadline(2.0) == pytest.approx(0.4)  # capped
    link = Link()
    start(link)
    frame1 = link.send(1, 300, 0.033)
    link.receive(frame1[1:], 0.034)
    link.receive(link.send(2, 100, 0.066), 0.067)
    link.asm.nack_request(0.07, rtt=0.05)  # the RTT is now known (50 ms)
    link.asm.poll(0.3)
    assert link.ids() == [0] and not link.asm.waiting_for_keyframe  # 233 ms: waiting
    link.asm.poll(0.33)
    assert link.asm.waiting_for_keyframe  # 263 ms: given up


def test_no_nacks_unless_the_peer_answers_them() -> None:
    link = Link()
    link.asm.nack_enabled = False
    start(link)
    frame1 = link.send(1, 300, 0.033)
    link.receive(frame1[1:], 0.034)
    link.receive(link.send(2, 100, 0.066), 0.067)
    for t in (0.05, 0.08, 0.1):
        assert link.nack(t) is None
    assert link.asm.waiting_for_keyframe  # lost after reorder_tolerance, as before NACKs


def test_only_keyframe_fragments_are_nacked_while_waiting_for_a_keyframe() -> None:
    link = Link()
    key = link.send(0, 500, 0.0, key=True)
    link.receive(key[:2] + key[3:], 0.0)  # fragment 2 of the keyframe lost
    delta = link.send(1, 300, 0.033)
    link.receive(delta[1:], 0.034)  # and one of a delta frame, useless until then
    assert link.nack(0.034) is None
    nack = link.nack(0.05)
    assert nack is not None and nack.entries == (NackEntry(0, 2),)
    link.receive(link.history.nacked(nack, 0.05), 0.051)
    assert link.ids() == [0]


# --------------------------------------------------------------------------- the history


def test_history_is_bounded_by_count_and_age() -> None:
    history = RetransmitHistory(RetransmitConfig(max_age=0.5, max_fragments=10))
    for fid in range(20):
        piece = VideoFragment(fid, 0, 1, 0, b"x" * 100)
        history.sent(piece, piece.encode(), fid * 0.01)
    assert len(history) == 10  # by count: frames 10..19
    assert history.nacked(VideoNack((NackEntry(9, 0),)), 0.2) == []
    assert history.statistics()["video_retransmit_unknown"] == 1
    assert len(history.nacked(VideoNack((NackEntry(19, 0),)), 0.2)) == 1
    history.nacked(VideoNack((NackEntry(19, 0),)), 0.685)
    assert len(history) == 1  # by age: only frame 19, sent at 0.19, is left at 0.685
    piece = VideoFragment(20, 0, 1, 0, b"x")
    history.sent(piece, piece.encode(), 0.8)
    assert len(history) == 1  # frame 19 is 0.61 s old


def test_each_fragment_is_resent_at_most_once_per_nack_and_max_resends_in_all() -> None:
    history = RetransmitHistory(RetransmitConfig(max_resends=2, budget_fraction=1.0))
    for fid in range(10):  # earn a budget
        piece = VideoFragment(fid, 0, 1, 0, b"z" * 100)
        history.sent(piece, piece.encode(), 0.0)
    for i in range(3):
        piece = VideoFragment(5, i, 3, 0, b"y" * 100)
        history.sent(piece, piece.encode(), 0.0)
    twice = VideoNack((NackEntry(5, 0, 0b1), NackEntry(5, 0), NackEntry(5, 1)))
    assert len(history.nacked(twice, 0.01)) == 2  # fragments 0 and 1, once each
    assert len(history.nacked(twice, 0.02)) == 2
    assert history.nacked(twice, 0.03) == []  # max_resends reached
    assert history.statistics()["video_retransmitted"] == 4


def test_the_retransmission_budget_holds_whatever_the_nacks() -> None:
    """A peer NACKing everything, again and again: what is resent stays within
    budget_fraction of the video sent, plus the burst."""
    config = RetransmitConfig(budget_fraction=0.2, burst_bytes=3000, max_resends=1000)
    history = RetransmitHistory(config)
    original = 0
    for fid in range(300):  # 10 s at 30 fps, 3 fragments of ~1000 bytes each
        pieces = fragment(fid, 0, bytes(3000), keyframe=False, max_datagram=1014)
        for piece in pieces:
            data = piece.encode()
            history.sent(piece, data, fid / 30)
            original += len(data)
        for _ in range(5):
            history.nacked(VideoNack((NackEntry(fid, NACK_WHOLE_FRAME),)), fid / 30)
    stats = history.statistics()
    assert stats["video_retransmit_over_budget"] > 0
    assert stats["video_retransmitted_bytes"] <= 0.2 * original + 3000
    assert stats["video_retransmitted_bytes"] >= 0.2 * original - 1100  # and it is spent


def test_scheduler_state_is_bounded() -> None:
    scheduler = NackScheduler(NackConfig(max_tracked=100, reorder_delay=0))
    missing = [(fid, i) for fid in range(20) for i in range(50)]
    nack = scheduler.due(missing, 0.0)
    assert nack is not None
    assert sum(len(e.fragments()) for e in nack.entries) <= 100
    assert len(nack.entries) <= MAX_NACK_ENTRIES


@given(
    st.lists(st.tuples(st.integers(0, 40), st.integers(0, 3), st.booleans()), max_size=150),
)
def test_a_lossy_link_with_nacks_never_fails_and_plays_in_order(
    sent: list[tuple[int, int, bool]],
) -> None:
    """Fragments of 4-piece frames, in any order, some lost, NACKs answered: frames come
    out whole and in order, and every NACK encodes and decodes."""
    link = Link()
    pieces = {
        fid: fragment(fid, fid, bytes(400), keyframe=fid % 10 == 0, max_datagram=114)
        for fid in range(41)
    }
    for step, (fid, index, lost) in enumerate(sent):
        now = step * 0.005
        piece = pieces[fid][index]
        data = piece.encode()
        link.history.sent(piece, data, now)
        if not lost:
            link.receive([data], now)
        nack = link.nack(now)
        if nack is not None:
            link.receive(link.history.nacked(nack, now), now)
    ids = link.ids()
    assert ids == sorted(set(ids))
    assert all(len(f.data) == 400 for f in link.played)


def test_a_peer_claiming_huge_frames_costs_bounded_work() -> None:
    """Partial frames that each claim 1024 fragments: what the receiver tracks and asks
    for stays within its bounds."""
    asm = FrameAssembler(AssemblerConfig(nack=NackConfig(reorder_delay=0, max_tracked=500)))
    asm.nack_enabled = True
    for fid in range(40):
        asm.push(VideoFragment(fid, 1023, 1024, 0, b"x", keyframe=True), 0.0)
    nack = asm.nack_request(0.0)
    assert nack is not None and 1 <= len(nack.entries) <= MAX_NACK_ENTRIES
    assert sum(len(e.fragments()) for e in nack.entries) <= 500
    assert asm.statistics()["fragments_nacked"] <= 500
