"""A stamp's ``issued_at``: UTC, to the microsecond, ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (ISO 8601: a four-digit year
even before 1000, which strftime's ``%Y`` does not give on every platform)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from distillgate.gateway.stamps import issue_stamp
from distillgate.ledger.signing import Signer


@pytest.mark.parametrize("when", [datetime(2026, 1, 2, 3, 4, 5, 0, tzinfo=UTC),
                                  datetime(2026, 12, 31, 23, 59, 59, 7, tzinfo=UTC),
                                  datetime(999, 6, 1, 0, 0, 0, 123456, tzinfo=UTC)])
def test_issued_at_is_the_utc_time_to_the_microsecond_with_a_z(when: datetime) -> None:
    stamp = issue_stamp(Signer.generate(), entry_index=1, entry_hash="a" * 64, policy_id="p", policy_hash="b" * 64,
                        user="u", project="proj", run="r", model="m", upstream_id=None, request_hash="c" * 64,
                        response_hash="d" * 64, issued_at=when)
    assert stamp.payload["issued_at"] == when.isoformat(timespec="microseconds").replace("+00:00", "Z")
    assert datetime.fromisoformat(stamp.payload["issued_at"]) == when


def test_issued_at_defaults_to_now() -> None:
    before = datetime.now(UTC)
    stamp = issue_stamp(Signer.generate(), entry_index=1, entry_hash="a" * 64, policy_id="p", policy_hash="b" * 64,
                        user=None, project=None, run=None, model=None, upstream_id=None, request_hash="c" * 64,
                        response_hash="d" * 64)
    assert before <= datetime.fromisoformat(stamp.payload["issued_at"]) <= datetime.now(UTC)
