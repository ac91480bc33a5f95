"""What a settlement charges: a pure function of the reservation and what the upstream reported.

* ``outcome="ok"``: the tokens used (prompt + completion) if reported, else the whole reservation; the records
  reported, else the records reserved.
* any other outcome (upstream error, timeout, client gone, gateway error): only what is known to have been used;
  the rest is refunded (state ``refunded`` when nothing at all was charged).
* The reservation is the upper bound granted against the quota: usage above it is an *overrun*, recorded
  (``USAGE_OVERRUN``) but never added to the counters, so granted never exceeds the quota.
* A reservation reclaimed while its request still ran (state ``expired``, already refunded) is charged what was
  used against nothing held (``late``).
"""

from __future__ import annotations

from dataclasses import dataclass

from distillgate.errors import UserError
from distillgate.ledger.records import Reservation

OUTCOME_REASONS = {"upstream_error": "UPSTREAM_ERROR", "timeout": "UPSTREAM_ERROR",
                   "client_disconnected": "CLIENT_DISCONNECTED", "gateway_error": "GATEWAY_ERROR"}


_new = object.__new__


@dataclass(frozen=True)
class Charge:
    tokens_charged: int
    records_charged: int
    state: str  # the reservation's new state
    overrun: int  # tokens reported above the reservation (not charged)
    late: bool  # settled after reclaim refunded it
    reasons: tuple[str, ...]

    def counter_deltas(self, reservation: Reservation) -> tuple[int, int]:
        """(tokens, records) to add to the quota counters: the charge minus what the reservation still holds."""
        held_t, held_r = (0, 0) if self.late else (reservation.tokens_reserved, reservation.records_reserved)
        return self.tokens_charged - held_t, self.records_charged - held_r


def charge(reservation: Reservation, *, outcome: str, prompt_tokens: int | None, completion_tokens: int | None,
           records: int | None, reasons: tuple[str, ...] = ()) -> Charge:
    late = reservation.state == "expired"
    if reservation.state != "held" and not late:
        raise UserError(f"reservation {reservation.id} is already {reservation.state}")
    t_res, r_res = reservation.tokens_reserved, reservation.records_reserved
    used = None if prompt_tokens is None and completion_tokens is None else \
        int(prompt_tokens or 0) + int(completion_tokens or 0)
    if outcome == "ok":
        tokens = used if used is not None else t_res
        recs = r_res if records is None else int(records)
        state = "settled"
    else:
        tokens = used or 0
        recs = int(records or 0)
        state = "refunded" if tokens == 0 and recs == 0 else "settled"
    overrun = max(0, tokens - t_res)
    codes = list(reasons)
    if outcome in OUTCOME_REASONS:
        codes.append(OUTCOME_REASONS[outcome])
    if overrun:
        codes.append("USAGE_OVERRUN")
    # Charge(...) without the frozen __init__ (one object.__setattr__ per field): one per settlement
    out = _new(Charge)
    out.__dict__.update(tokens_charged=tokens - overrun, records_charged=min(recs, r_res), state=state,
                        overrun=overrun, late=late, reasons=tuple(dict.fromkeys(codes)))
    return out
