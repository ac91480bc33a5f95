"""``header_map``: the request headers the gateway reads, with their bounds (431, 400 for a repeated identity
header), on the function itself; tests/adversarial/test_adv_requests.py sends the same over real HTTP."""

from __future__ import annotations

import pytest

from distillgate.gateway.errors import ApiError
from distillgate.gateway.http import header_map


def scope(*headers: tuple[str, str]) -> dict[str, object]:
    return {"headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]}


def test_names_are_read_as_sent_and_a_repeated_other_header_keeps_its_last_copy() -> None:
    got = header_map(scope(("x-policy-project", "bank"), ("accept", "a"), ("accept", "b"), ("x-note", "é")), 1 << 10)
    assert got == {"x-policy-project": "bank", "accept": "b", "x-note": "é"}


@pytest.mark.parametrize("name", ["authorization", "x-api-key", "x-policy-user", "x-policy-project", "x-policy-run",
                                  "x-policy-output-type", "x-policy-run-size", "content-length"])
def test_a_repeated_identity_header_is_refused_wherever_the_copies_are(name: str) -> None:
    with pytest.raises(ApiError) as err:
        header_map(scope((name, "a"), ("accept", "x"), ("accept", "y"), (name, "b")), 1 << 10)
    assert err.value.status == 400 and err.value.param == name


def test_the_bound_counts_every_name_and_value_and_four_bytes_per_header() -> None:
    headers = (("a" * 10, "b" * 20), ("c" * 5, "d" * 5))
    exact = 10 + 20 + 4 + 5 + 5 + 4
    assert header_map(scope(*headers), exact) == {"a" * 10: "b" * 20, "c" * 5: "d" * 5}
    with pytest.raises(ApiError) as err:
        header_map(scope(*headers), exact - 1)
    assert err.value.status == 431
