"""What the fuzz tests share: hypothesis settings, the mutation strategy, and
``refused`` (tests/test_fuzz_decoders.py, tests/test_fuzz_decrypt.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from p2pd.session.envelope import InitialHeader, RatchetHeader

#: Examples per fuzz property in one run: the counts written in the tests times this.
#: 0.5 by default since issue 9 (the suite's CPU): half the random inputs per run that
#: the counts say (test_wire + test_fuzz_decoders: 15 -> 7 s of CPU). Each run draws new
#: ones, and hypothesis' database (.hypothesis/) replays any that failed, so two runs
#: cover what one run did before. P2PD_FUZZ_SCALE=1 gives the written counts, more for
#: a longer hunt.
FUZZ_SCALE = float(os.environ.get("P2PD_FUZZ_SCALE", "0.5"))


def examples(count: int) -> int:
    """``count`` examples scaled by :data:`FUZZ_SCALE`, at least 10."""
    return max(10, round(count * FUZZ_SCALE))


FUZZ = settings(max_examples=examples(200), deadline=None)
#: The session tests run real X3DH and Double Ratchet code per example.
FUZZ_SLOW = settings(
    max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

T = TypeVar("T")
NOW = 1_700_000_000


def exactly(n: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=n, max_size=n)


def refused(errors: type[Exception] | tuple[type[Exception], ...], call: Callable[[], T]) -> bool:
    """Run ``call``: True if it raised one of ``errors``, False if it returned. Anything
    else propagates, and hypothesis reports it with the input that caused it."""
    try:
        call()
    except errors:
        return True
    return False


# --------------------------------------------------------------------------- mutations


def mutate(data: st.DataObject, valid: bytes) -> bytes:
    """``valid`` with one to four edits, each a bit flip, an overwritten, inserted or
    deleted byte, a truncation or an extension."""
    out = bytearray(valid)
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        op = data.draw(
            st.sampled_from(["flip", "set", "insert", "delete", "truncate", "extend"]),
            label="op",
        )
        if op in ("flip", "set", "delete") and not out:
            op = "extend"
        if op == "flip":
            i = data.draw(st.integers(0, len(out) - 1), label="at")
            out[i] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        elif op == "set":
            i = data.draw(st.integers(0, len(out) - 1), label="at")
            out[i] = data.draw(
                st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]) | st.integers(0, 255)
            )
        elif op == "insert":
            i = data.draw(st.integers(0, len(out)), label="at")
            out[i:i] = data.draw(st.binary(min_size=1, max_size=8), label="inserted")
        elif op == "delete":
            i = data.draw(st.integers(0, len(out) - 1), label="at")
            del out[i : i + data.draw(st.integers(1, 8), label="deleted")]
        elif op == "truncate":
            del out[data.draw(st.integers(0, len(out)), label="cut") :]
        else:
            out += data.draw(st.binary(min_size=1, max_size=64), label="extension")
    return bytes(out)


# The parts of a session envelope (its decoder, and decrypt, are fuzzed with them).
keys32 = exactly(32)
counters = st.integers(0, (1 << 32) - 1)
initial_headers = st.builds(
    InitialHeader, keys32, keys32, keys32, st.integers(0, (1 << 64) - 1), st.none() | keys32
)
ratchet_headers = st.builds(RatchetHeader, keys32, counters, counters)
ciphertexts = st.integers(0, 20).flatmap(lambda n: exactly(48 + 16 * n))
