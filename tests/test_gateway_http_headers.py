"""``header_map``: the request headers the gateway reads, with their bounds (431, 400 for a repeated identity
header), and ``BodyReader``'s deadline (408), on the functions themselves; tests/adversarial/test_adv_requests.py
sends the same over real HTTP."""

from __future__ import annotations

import asyncio

import pytest

from distillgate.gateway.errors import ApiError
from distillgate.gateway.http import BodyReader, Message, header_map


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


async def _never() -> Message:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


def test_a_body_past_its_deadline_is_408_and_a_cancellation_from_outside_stays_one() -> None:
    async def main() -> None:
        reader = BodyReader(1 << 10, 0.05, 4)
        with pytest.raises(ApiError) as err:
            await reader.read({}, _never)
        assert err.value.status == 408 and err.value.code == "request_timeout" and reader.reading == 0
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0  # the deadline's own cancellation was taken back

        waiting = asyncio.ensure_future(reader.read({}, _never))
        await asyncio.sleep(0.01)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert reader.reading == 0

        both = asyncio.ensure_future(reader.read({}, _never))  # cancelled from outside as the deadline passes
        asyncio.get_running_loop().call_later(0.05, both.cancel)
        with pytest.raises(asyncio.CancelledError):
            await both

        async def whole() -> Message:
            return {"type": "http.request", "body": b"{}", "more_body": False}
        assert await reader.read({"content-length": "2"}, whole) == b"{}"
        await asyncio.sleep(0.1)  # the timer of a body that arrived is gone: nothing is cancelled later
        assert reader.reading == 0

    asyncio.run(main())
