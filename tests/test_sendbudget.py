"""The send key's record budget (RFC 8446 §5.5), sans I/O."""

from __future__ import annotations

from ktls.constants import MAX_PLAINTEXT
from ktls.core.sendbudget import SendBudget


def test_no_limit_never_asks() -> None:
    budget = SendBudget(None)
    assert not budget.sent(10**9)
    assert not budget.kernel_count(10**9)


def test_upper_bound_then_the_kernels_exact_count() -> None:
    budget = SendBudget(100, records_sent=2)
    assert not budget.sent(MAX_PLAINTEXT * 50)  # at most 51 records: bound 53
    assert budget.bound == 53
    assert budget.sent(MAX_PLAINTEXT * 50)  # bound 104 ≥ 100: ask the kernel
    assert not budget.kernel_count(70)  # the kernel counted 70 (sends of part-records): not yet
    assert budget.bound == 70
    assert budget.kernel_count(100)
    budget.rekeyed()
    assert budget.bound == 0
    assert budget.kernel_count(None)  # the kernel could not say: assume the limit
