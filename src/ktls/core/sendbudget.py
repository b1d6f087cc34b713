"""How many records the send key has protected, against the RFC 8446 §5.5 limit — sans I/O.

Counting exactly would need the kernel's sequence number after every send. Instead we keep an upper bound
(a send of ``n`` bytes makes at most ``1 + n // 2^14`` records) and only ask the kernel
(``getsockopt(TLS_TX)``, whose ``rec_seq`` is exact) when the bound reaches the limit; the key is updated
when the kernel's own count says so. Shared by the blocking Stream's logic and the asyncio transport.
"""

from __future__ import annotations

from ..constants import MAX_PLAINTEXT

__all__ = ["SendBudget"]


class SendBudget:
    """The send key's record budget. ``limit`` ``None``: nothing to count (TLS 1.2, or no kernel rekey)."""

    def __init__(self, limit: int | None, records_sent: int = 0) -> None:
        self.limit = limit
        #: An upper bound of the records sent under the current send key.
        self.bound = records_sent

    def sent(self, nbytes: int) -> bool:
        """``nbytes`` went out in one send; ``True`` when the caller must ask the kernel (:meth:`kernel_count`)."""
        if self.limit is None:
            return False
        self.bound += 1 + nbytes // MAX_PLAINTEXT
        return self.bound >= self.limit

    def kernel_count(self, rec_seq: int | None) -> bool:
        """The kernel's exact count (``None``: it could not say); ``True`` when the key must be updated now."""
        if self.limit is None:
            return False
        self.bound = self.limit if rec_seq is None else rec_seq
        return self.bound >= self.limit

    def rekeyed(self) -> None:
        """A new send key is in place: its records start at 0."""
        self.bound = 0
