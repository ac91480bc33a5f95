"""The settlement charging rules (ledger/charging.py), as a pure function: no store, no clock."""

from __future__ import annotations

import pytest

from distillgate.errors import UserError
from distillgate.ledger.charging import charge
from distillgate.ledger.records import Reservation


def held(tokens: int = 100, records: int = 2, state: str = "held") -> Reservation:
    return Reservation("r1", 7, "p", "alice", "run", "2026-12-02", tokens, records, state)


def test_ok_charges_what_was_used_and_gives_back_the_rest() -> None:
    c = charge(held(), outcome="ok", prompt_tokens=10, completion_tokens=20, records=1)
    assert (c.tokens_charged, c.records_charged, c.state, c.overrun, c.reasons) == (30, 1, "settled", 0, ())
    assert c.counter_deltas(held()) == (30 - 100, 1 - 2)


def test_ok_without_usage_charges_the_whole_reservation() -> None:
    c = charge(held(), outcome="ok", prompt_tokens=None, completion_tokens=None, records=None)
    assert (c.tokens_charged, c.records_charged) == (100, 2) and c.counter_deltas(held()) == (0, 0)


def test_usage_above_the_reservation_is_an_overrun_never_charged() -> None:
    c = charge(held(), outcome="ok", prompt_tokens=90, completion_tokens=60, records=5)
    assert (c.tokens_charged, c.records_charged, c.overrun) == (100, 2, 50)
    assert c.reasons == ("USAGE_OVERRUN",)


@pytest.mark.parametrize(("outcome", "code"), [("upstream_error", "UPSTREAM_ERROR"), ("timeout", "UPSTREAM_ERROR"),
                                                ("client_disconnected", "CLIENT_DISCONNECTED"),
                                                ("gateway_error", "GATEWAY_ERROR")])
def test_a_failure_charges_only_what_is_known_used(outcome: str, code: str) -> None:
    nothing = charge(held(), outcome=outcome, prompt_tokens=None, completion_tokens=None, records=None,
                     reasons=(code,))
    assert (nothing.tokens_charged, nothing.records_charged, nothing.state) == (0, 0, "refunded")
    assert nothing.reasons == (code,)  # named once, whoever added it
    some = charge(held(), outcome=outcome, prompt_tokens=12, completion_tokens=None, records=None)
    assert (some.tokens_charged, some.state, some.reasons) == (12, "settled", (code,))


def test_a_late_settlement_charges_against_nothing_held() -> None:
    expired = held(state="expired")
    c = charge(expired, outcome="ok", prompt_tokens=5, completion_tokens=5, records=1)
    assert c.late and c.counter_deltas(expired) == (10, 1)


@pytest.mark.parametrize("state", ["settled", "refunded"])
def test_a_closed_reservation_cannot_be_settled_again(state: str) -> None:
    with pytest.raises(UserError, match=f"already {state}"):
        charge(held(state=state), outcome="ok", prompt_tokens=1, completion_tokens=1, records=1)
