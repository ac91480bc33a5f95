"""Stale answers are never reused: a generation setting that changes an answer makes stored answers stale.

Real gateway over loopback in front of the fake teacher (tests/fakes), as in test_generate_job.py.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from _gateway_support import running_gateway
from _generate_support import make_dataset, stored_rows
from distillgate.data.generate import (
    OPERATIONAL_SETTINGS,
    GatewayTarget,
    GenerateSettings,
    PromptTemplate,
    answer_key,
    generate,
    parse_settings,
)
from distillgate.data.store import WorkingCopy
from distillgate.errors import UserError

TEMPLATE = PromptTemplate(id="intent-v1", system="You label banking messages.",
                          user="Message: {input}\nAnswer with one intent.")


def settings(**over: object) -> GenerateSettings:
    base: dict[str, object] = {"model": "fake-teacher", "user": "alice", "project": "proj-a", "run": "gen-1",
                               "output_type": "summaries", "concurrency": 4, "backoff_s": 0.01,
                               "temperature": 0.0, "max_tokens": 16}
    return parse_settings({**base, **over})


@pytest.mark.parametrize(("change", "expected"), [
    ({"temperature": 0.7}, "temperature: 0.0 -> 0.7"),
    ({"max_tokens": 32}, "max_tokens: 16 -> 32"),
    ({"seed": 5}, "seed: 0 -> 5"),
    ({"label_scoring": "mean", "labels": ["a", "b"]}, "label_scoring: False -> 'mean'"),
    ({"answer_context": {"teacher": {"upstream": "http://elsewhere/v1"}}}, "answer_context"),
])
def test_changed_setting_refuses_then_regenerates(tmp_path: Path, change: dict[str, object], expected: str) -> None:
    root = make_dataset(tmp_path, 4)
    with running_gateway(tmp_path) as gw, WorkingCopy.open(root) as wc:
        target = GatewayTarget(gw.base_url, gw.keys["alice"])
        first = generate(wc, TEMPLATE, settings(), target)
        served = gw.fake.served
        with pytest.raises(UserError) as err:
            generate(wc, TEMPLATE, settings(**change), target)
        assert gw.fake.served == served  # refused before asking anything
        assert "4 stored teacher answer(s)" in err.value.message and expected in err.value.message
        assert "--regenerate" in str(err.value.hint)
        assert len(stored_rows(root)) == 4  # nothing discarded by a refusal
        again = generate(wc, TEMPLATE, settings(**change), target, stale="regenerate")
        assert gw.fake.served == served + 4  # every answer asked again
    assert first.added == 4
    assert (again.discarded, again.added, again.already_present) == (4, 4, 0)
    key = answer_key(TEMPLATE, settings(**change))
    assert {r["sampling"]["answer_key"] for r in stored_rows(root)} == {key}


def test_changed_prompt_is_stale(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, 3)
    other = PromptTemplate(id="intent-v1", system="You label smart-home requests.", user=TEMPLATE.user)
    with running_gateway(tmp_path) as gw, WorkingCopy.open(root) as wc:
        target = GatewayTarget(gw.base_url, gw.keys["alice"])
        generate(wc, TEMPLATE, settings(), target)
        with pytest.raises(UserError, match="the prompt template changed"):
            generate(wc, other, settings(), target)
        report = generate(wc, other, settings(), target, stale="regenerate")
    assert report.discarded == 3
    assert all(r["output_raw"] for r in stored_rows(root))
    assert {r["prompt_template_sha256"] for r in stored_rows(root)} == {other.sha256}


def test_operational_settings_reuse_answers(tmp_path: Path) -> None:
    """Who asks and how hard the job pushes never change an answer: those reruns reuse what is stored."""
    root = make_dataset(tmp_path, 3)
    with running_gateway(tmp_path) as gw, WorkingCopy.open(root) as wc:
        target = GatewayTarget(gw.base_url, gw.keys["alice"])
        generate(wc, TEMPLATE, settings(), target)
        served = gw.fake.served
        same = generate(wc, TEMPLATE, settings(concurrency=1, timeout_s=9, max_attempts=2, run="gen-2"), target)
        more = generate(wc, TEMPLATE, settings(k=2), target)  # k only adds samples
        assert gw.fake.served == served + 3
    assert (same.discarded, same.added, same.already_present) == (0, 0, 3)
    assert (more.discarded, more.added) == (0, 3)


def test_every_other_setting_is_in_the_answer_key() -> None:
    """A setting added to GenerateSettings later is covered unless someone declares it operational."""
    base = settings()
    for name in GenerateSettings.model_fields:
        if name in OPERATIONAL_SETTINGS:
            continue
        assert name in {"model", "temperature", "top_p", "max_tokens", "seed", "logprobs",
                        "top_logprobs", "labels", "label_scoring", "answer_context"}, name
    assert answer_key(TEMPLATE, base) != answer_key(TEMPLATE, settings(top_p=0.9))
    assert answer_key(TEMPLATE, base) != answer_key(TEMPLATE, settings(model="other-teacher"))
    assert answer_key(TEMPLATE, base) == answer_key(TEMPLATE, settings(user="bob", concurrency=64))


def test_legacy_rows_without_key_are_compared_by_what_they_recorded(tmp_path: Path) -> None:
    """Rows stored before answer keys existed: same recorded sampling is reused, another is stale."""
    root = make_dataset(tmp_path, 2)
    with running_gateway(tmp_path) as gw, WorkingCopy.open(root) as wc:
        target = GatewayTarget(gw.base_url, gw.keys["alice"])
        generate(wc, TEMPLATE, settings(), target)
        with wc.transaction() as conn:  # strip the keys, as an older distillgate wrote the rows
            for row in wc.rows():
                assert row.sampling is not None
                row.sampling.pop("answer_key")
                conn.execute("UPDATE rows SET body=? WHERE row_id=?", (orjson.dumps(row.to_record()), row.row_id))
        assert generate(wc, TEMPLATE, settings(), target).already_present == 2
        with pytest.raises(UserError, match="2 stored teacher answer"):
            generate(wc, TEMPLATE, settings(temperature=1.0), target)


def test_cli_refuses_and_regenerate_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from distillgate.cli.main import main

    def run(*extra: str) -> tuple[int, str]:
        try:
            main([*common, *extra])
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return code, out.out + out.err

    root = make_dataset(tmp_path, 2)
    with running_gateway(tmp_path) as gw:
        common = ["dataset", "generate", str(root), "--template", "Message: {input}", "--model", "fake-teacher",
                  "--user", "alice", "--project", "proj-a", "--output-type", "summaries",
                  "--gateway", gw.base_url, "--api-key", gw.keys["alice"]]
        assert run("--temperature", "0", "--no-progress")[0] == 0
        code, text = run("--temperature", "0.9", "--no-progress")
        assert code == 1 and "temperature: 0.0 -> 0.9" in text and "--regenerate" in text
        code, text = run("--temperature", "0.9", "--regenerate")  # with progress, and stderr is no terminal
        assert code == 0, text
        assert "discarded 2 stale answer(s)" in text and "2 row(s) added" in text
        assert "generate: 2 rows to ask for (0 already stored)" in text and "generate: 2/2 rows (100%)" in text
    assert {r["sampling"]["temperature"] for r in stored_rows(root)} == {0.9}
