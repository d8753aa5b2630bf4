"""Safety numbers: 60 digits two people compare to know they hold each other's keys.

Signal's numeric fingerprint, adapted to p2pd's keys. For each identity key::

    h = version (u16, 0) || key
    repeat 5200 times: h = SHA-512(h || key)
    digits = for each of the first six 5-byte chunks of h: (chunk as u40) mod 100000,
             written as 5 digits

(Signal also hashes a stable identifier, the account's phone number or ACI, into the
start; in p2pd the key is the identity, so there is nothing to add.) The two 30-digit
halves are sorted and joined, so both people see the same 60 digits whoever computes
them, shown in twelve groups of five. The 5200 iterations make finding a second key with
the same 30 digits cost about 2^112 hash calls instead of 2^100.

`p2pd verify` also shows a QR code of ``p2pd-safety:0:<60 digits>`` (drawn by segno in
the terminal), for a phone to compare.
"""

from __future__ import annotations

import hashlib

from ..errors import UsageError

VERSION = 0
ITERATIONS = 5200
KEY_LEN = 32
DIGITS = 60
GROUP = 5


def key_digits(public_key: bytes) -> str:
    """The 30 digits that stand for one identity key."""
    if not isinstance(public_key, bytes) or len(public_key) != KEY_LEN:
        raise UsageError("a safety number needs 32-byte Ed25519 public keys")
    digest = VERSION.to_bytes(2, "big") + public_key
    for _ in range(ITERATIONS):
        digest = hashlib.sha512(digest + public_key).digest()
    return "".join(
        f"{int.from_bytes(digest[i : i + 5], 'big') % 100_000:05d}" for i in range(0, 30, 5)
    )


def safety_number(key_a: bytes, key_b: bytes) -> str:
    """The safety number of two identity keys, order-independent:
    ``"12345 67890 ..."``, twelve groups of five digits."""
    digits = "".join(sorted((key_digits(key_a), key_digits(key_b))))
    return " ".join(digits[i : i + GROUP] for i in range(0, DIGITS, GROUP))
