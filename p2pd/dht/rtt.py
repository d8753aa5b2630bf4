"""Round-trip estimates per contact (RFC 6298, section 2), sans I/O.

Stock kademlia waits a fixed 5 s for every reply, so each dead contact costs a lookup 5 s.
We keep a smoothed RTT and its variance per address, and one for the network as a whole
(used for contacts we have never measured); a lookup stops *waiting* on a contact after
``rto()`` and asks another, while a late reply is still used until the hard timeout.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

#: RFC 6298 gains.
ALPHA = 1 / 8
BETA = 1 / 4


@dataclass(slots=True)
class RttEstimate:
    srtt: float | None = None
    rttvar: float = 0.0

    def sample(self, rtt: float) -> None:
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = (1 - BETA) * self.rttvar + BETA * abs(self.srtt - rtt)
            self.srtt = (1 - ALPHA) * self.srtt + ALPHA * rtt

    def rto(self, minimum: float, maximum: float, default: float) -> float:
        if self.srtt is None:
            return min(max(default, minimum), maximum)
        return min(max(self.srtt + 4 * self.rttvar, minimum), maximum)


class RttTable:
    """Estimates for at most ``capacity`` addresses (least recently used forgotten)."""

    def __init__(self, minimum: float, maximum: float, capacity: int = 4096) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.capacity = capacity
        self.overall = RttEstimate()
        self._per: OrderedDict[tuple[str, int], RttEstimate] = OrderedDict()

    def sample(self, address: tuple[str, int], rtt: float) -> None:
        self.overall.sample(rtt)
        est = self._per.get(address)
        if est is None:
            est = self._per[address] = RttEstimate()
            while len(self._per) > self.capacity:
                self._per.popitem(last=False)
        else:
            self._per.move_to_end(address)
        est.sample(rtt)

    def rto(self, address: tuple[str, int]) -> float:
        default = self.overall.rto(self.minimum, self.maximum, self.maximum)
        est = self._per.get(address)
        if est is None:
            return default
        return est.rto(self.minimum, self.maximum, default)

    def smoothed(self, address: tuple[str, int]) -> float | None:
        """The smoothed round trip to ``address`` (the overall one if never measured;
        None if nothing was ever measured)."""
        est = self._per.get(address)
        if est is None or est.srtt is None:
            return self.overall.srtt
        return est.srtt
