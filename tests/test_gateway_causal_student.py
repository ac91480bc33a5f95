"""Causal-LM students served as ``student/NAME`` and routed: tiny Llama students really trained by the SFT recipe
(one with a label set, one without), served by name over real HTTP to the openai SDK; the policy's approval and
the promotion record govern whether a route may answer with the student."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from openai import NotFoundError as OpenAINotFound

from _gateway_support import write_policies
from _train_support import LABELS, freeze_rows, save_model, toy_rows
from distillgate.errors import ConfigError
from distillgate.evals.promotion import promote
from distillgate.evals.routing import RouteThreshold, save_threshold
from distillgate.gateway.config import config_from_data
from distillgate.ledger.store import Store
from distillgate.policy.model import policy_from_data
from distillgate.train import parse_config, run_recipe
from distillgate.train.config import PromptSettings
from distillgate.train.encode import answer_ids, prompt_ids
from distillgate.train.labels import label_distribution
from test_gateway_routes import POLICY, ask, client, gateway
from test_promotion import _classification

TEMPLATE = "say the word {input}"
CAUSAL_POLICY: dict[str, Any] = {**POLICY, "approved_models": ["fake-teacher", "toy-intent", "student/*"]}


def _train(tmp: Path, labels: list[str] | None) -> Path:
    base = save_model(tmp / "base", seed=2)
    rows = toy_rows(96)
    freeze_rows(tmp, rows)
    doc: dict[str, Any] = {"recipe": "sft", "dataset": str(tmp / "ds"), "output_dir": str(tmp / "out"),
                           "student": {"model": {"path": str(base)}}, "prompt": {"template": TEMPLATE},
                           "epochs": 4, "batch_size": 8, "lr": 1e-2, "log_every": 1000, "threads": 1}
    if labels is not None:
        doc["labels"] = labels
    return run_recipe(parse_config(doc, "test")).model_dir.parent  # the run's output_dir


@pytest.fixture(scope="module")
def label_student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("label-student"), LABELS)


@pytest.fixture(scope="module")
def text_student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _train(tmp_path_factory.mktemp("text-student"), None)


def _threshold(path: Path, value: float, kind: str = "label_prob") -> Path:
    save_threshold(RouteThreshold(threshold=value, confidence=kind, student="student/toy",  # type: ignore[arg-type]
                                  teacher="fake-teacher", suite="toy", target=0.95, min_items=5, coverage=0.5,
                                  student_accuracy=0.9, teacher_accuracy=1.0, system_accuracy=0.95, items=40), path)
    return path


def _inputs(n: int, seed: int = 11) -> list[str]:
    return [TEMPLATE.replace("{input}", r["input"]) for r in toy_rows(n, seed=seed)]


def _reference_probs(student: Path, text: str) -> dict[str, float]:
    """The label distribution as training scores it (train.labels over train.encode's prompt): an independent
    implementation of what serving must compute."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student / "model")
    model = AutoModelForCausalLM.from_pretrained(student / "model").eval()
    raw = text[len("say the word "):]
    with torch.no_grad():
        probs = label_distribution(model, prompt_ids(tok, PromptSettings(template=TEMPLATE), raw),
                                   [answer_ids(tok, lab) for lab in LABELS])
    return dict(zip(LABELS, probs.tolist(), strict=True))


def test_a_causal_label_student_is_served_by_name_and_scores_its_label_set_as_training_does(
        tmp_path: Path, label_student: Path) -> None:
    with gateway(tmp_path, label_student, _threshold(tmp_path / "t.json", 0.5),
                 policies=(CAUSAL_POLICY,)) as (url, _gw, _fake, key):
        c = client(url, key)
        card = {m.id: m for m in c.models.list().data}["student/toy"].model_extra["card"]
        assert card["family"] == "causal_lm" and card["task"] == "labels" and card["labels"] == LABELS
        assert card["confidence"] == "label_prob" and card["architecture"] == "llama" and card["parameter_count"] > 0
        assert str(label_student) not in json.dumps(card)  # what it is, never where it is
        for text in _inputs(4):
            a = ask(c, text, model="student/toy")
            served = a.choices[0].model_extra["label_probs"]
            reference = _reference_probs(label_student, text)
            assert a.model == "student/toy" and a.choices[0].message.content == max(reference, key=reference.get)
            assert all(abs(served[k] - reference[k]) < 1e-4 for k in LABELS), (served, reference)
            assert a.usage is not None and a.usage.prompt_tokens == len(text.split())  # word-level tokens, plain
        legacy = c.completions.create(model="student/toy", prompt=_inputs(1)[0], max_tokens=4)
        assert legacy.model == "student/toy" and legacy.choices[0].text in LABELS
        with pytest.raises(OpenAINotFound, match="not a student of this gateway"):
            ask(c, _inputs(1)[0], model="student/" + str(label_student / "model"))


def test_a_route_to_a_causal_label_student_follows_its_label_probability(tmp_path: Path,
                                                                        label_student: Path) -> None:
    texts = _inputs(16, seed=5)
    confidences = sorted(max(_reference_probs(label_student, t).values()) for t in texts)
    cut = confidences[len(confidences) // 2]  # about half the traffic is sure enough
    with gateway(tmp_path, label_student, _threshold(tmp_path / "t.json", cut),
                 policies=(CAUSAL_POLICY,)) as (url, _gw, fake, key):
        fake.set_reply("maybe")
        c = client(url, key)
        taken = []
        for text in texts:
            a = ask(c, text)
            route = a.model_extra["distillgate"]["route"]
            sure = max(_reference_probs(label_student, text).values())
            assert (a.model == "student/toy") == (sure >= cut), (text, sure, cut)
            assert route["taken"] == ("student" if sure >= cut else "teacher")
            assert abs(route["confidence"] - sure) < 1e-4
            taken.append(route["taken"])
        assert 0 < taken.count("student") < len(texts)


def test_a_causal_text_student_generates_and_routes_on_its_mean_token_probability(tmp_path: Path,
                                                                                 text_student: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(text_student / "model")
    model = AutoModelForCausalLM.from_pretrained(text_student / "model").eval()
    texts = _inputs(8, seed=3)
    with gateway(tmp_path / "a", text_student, _threshold(tmp_path / "t0.json", 0.5, "mean_token_prob"),
                 policies=(CAUSAL_POLICY,)) as (url, _gw, _fake, key):
        c = client(url, key)
        card = {m.id: m for m in c.models.list().data}["student/toy"].model_extra["card"]
        assert card["task"] == "text" and card["labels"] is None and card["confidence"] == "mean_token_prob"
        sure: dict[str, float] = {}
        for text in texts:  # greedy generation as transformers does it, on the prompt training used
            a = c.chat.completions.create(model="student/toy", messages=[{"role": "user", "content": text}],
                                          max_tokens=3, temperature=0, logprobs=True)
            ids = torch.tensor([prompt_ids(tok, PromptSettings(template=TEMPLATE), text[len("say the word "):])])
            with torch.no_grad():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
            assert a.choices[0].message.content == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            lps = [t.logprob for t in a.choices[0].logprobs.content]
            sure[text] = math.exp(sum(lps) / len(lps))
    cut = sorted(sure.values())[len(sure) // 2]
    with gateway(tmp_path / "b", text_student, _threshold(tmp_path / "t1.json", cut, "mean_token_prob"),
                 policies=(CAUSAL_POLICY,)) as (url, _gw, fake, key):
        fake.set_reply("teacher text")
        c = client(url, key)
        for text in texts:
            a = c.chat.completions.create(model="toy-intent", messages=[{"role": "user", "content": text}],
                                          max_tokens=3, temperature=0)
            route = a.model_extra["distillgate"]["route"]
            assert abs(route["confidence"] - sure[text]) < 1e-4
            assert (a.model == "student/toy") == (sure[text] >= cut), (text, sure[text], cut)
            if a.model == "fake-teacher":
                assert a.choices[0].message.content == "teacher text"
    # a threshold chosen on label probabilities cannot route a text student: the start says so
    data = {"policy": str(write_policies(tmp_path / "p", CAUSAL_POLICY)), "db": str(tmp_path / "g.db"),
            "students": {"toy": str(text_student)},
            "routes": {"toy-intent": {"student": "toy", "teacher": "fake-teacher",
                                      "threshold": str(_threshold(tmp_path / "t2.json", 0.5))}}}
    with pytest.raises(ConfigError, match="'label_prob', but the student's verdicts carry 'mean_token_prob'"):
        config_from_data(data)


def test_a_route_answers_with_the_student_only_where_the_projects_policy_lets_it(
        tmp_path: Path, label_student: Path) -> None:
    approving = {**CAUSAL_POLICY, "policy_id": "a", "allowed_projects": ["proj-a"]}
    withholding = {**POLICY, "policy_id": "b", "allowed_projects": ["proj-b"],
                   "approved_models": ["fake-teacher", "toy-intent"]}  # the routed name, not the student
    promoted_only = {**CAUSAL_POLICY, "policy_id": "c", "allowed_projects": ["proj-c"],
                     "promotion": {"required_for_routing": True}}  # and this student was never promoted
    with gateway(tmp_path, label_student, _threshold(tmp_path / "t.json", 0.0),
                 policies=(approving, withholding, promoted_only)) as (url, gw, fake, key):
        fake.set_reply("maybe")
        text = _inputs(1)[0]
        a = ask(client(url, key, project="proj-a"), text)
        assert a.model == "student/toy"
        b = ask(client(url, key, project="proj-b"), text)
        assert b.model == "fake-teacher"
        assert b.model_extra["distillgate"]["route"]["reason"] == "student_not_approved"
        c = ask(client(url, key, project="proj-c"), text)
        assert c.model == "fake-teacher" and c.model_extra["distillgate"]["route"]["reason"] == "not_promoted"
        routes = [e.body["extra"]["route"] for e in gw.store.entries() if "route" in (e.body.get("extra") or {})]
        assert [r["reason"] for r in routes] == ["confident", "student_not_approved", "not_promoted"]
        # a prompt longer than the student's context (64 positions) is not scored past it: the teacher answers
        long = ask(client(url, key, project="proj-a"), "say the word " + " ".join(["alpha"] * 80))
        assert long.model == "fake-teacher" and long.model_extra["distillgate"]["route"]["reason"] == "student_error"


def test_require_promoted_is_checked_again_when_the_student_loads(tmp_path: Path, label_student: Path) -> None:
    import shutil

    promoted = shutil.copytree(label_student, tmp_path / "promoted")
    _classification(tmp_path / "eval", student_correct=40)  # run r1: the student as good as the teacher
    gates = policy_from_data({"policy_id": "gates", "allowed_projects": ["proj-a"], "allowed_outputs": ["labels"],
                              "promotion": {"min_retention": 0.8}})
    with Store.open(tmp_path / "gov.db") as store:
        assert promote(store, gates, promoted, user="alice", evals=[tmp_path / "eval"], project="proj-a",
                       run="r1").allowed
    threshold = _threshold(tmp_path / "t.json", 0.0)  # every request is the student's
    with gateway(tmp_path / "a", promoted, threshold, policies=(CAUSAL_POLICY,),
                 require_promoted=True) as (url, _gw, _fake, key):
        assert ask(client(url, key), _inputs(1)[0]).model == "student/toy"
    # the files change after the gateway checked the record at start, before a request loads the student
    with gateway(tmp_path / "b", promoted, threshold, policies=(CAUSAL_POLICY,),
                 require_promoted=True) as (url, _gw, fake, key):
        (promoted / "model" / "notes.txt").write_text("retrained since")
        fake.set_reply("maybe")
        a = ask(client(url, key), _inputs(1)[0])
        assert a.model == "fake-teacher" and a.model_extra["distillgate"]["route"]["reason"] == "not_promoted"
    with pytest.raises(ConfigError, match="model files differ"), \
            gateway(tmp_path / "c", promoted, threshold, policies=(CAUSAL_POLICY,), require_promoted=True):
        pass  # and the next start refuses it outright
    # the run record is pinned too: a label set edited after promotion is not the promoted student
    (promoted / "model" / "notes.txt").unlink()
    record = json.loads((promoted / "run.json").read_text())
    (promoted / "run.json").write_text(json.dumps({**record, "config": {**record["config"],
                                                                        "labels": [*LABELS, "card"]}}))
    with pytest.raises(ConfigError, match=r"the run record \(run.json\) differs"), \
            gateway(tmp_path / "d", promoted, threshold, policies=(CAUSAL_POLICY,), require_promoted=True):
        pass


def test_concurrent_routed_requests_to_a_causal_student_each_get_their_own_verdict(tmp_path: Path,
                                                                                  label_student: Path) -> None:
    """The label worker scores concurrent requests as one batch: each answer must still be its own prompt's."""
    import asyncio

    from openai import AsyncOpenAI

    texts = _inputs(12, seed=21)
    with gateway(tmp_path, label_student, _threshold(tmp_path / "t.json", 0.0),
                 policies=(CAUSAL_POLICY,)) as (url, _gw, _fake, key):

        async def go() -> list[Any]:
            ac = AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0,
                             default_headers=client(url, key).default_headers)
            return await asyncio.gather(*[ac.chat.completions.create(
                model="toy-intent", messages=[{"role": "user", "content": t}], max_tokens=4) for t in texts])

        answers = asyncio.run(go())
    for text, a in zip(texts, answers, strict=True):
        reference = _reference_probs(label_student, text)
        assert a.model == "student/toy"
        assert abs(a.model_extra["distillgate"]["route"]["confidence"] - max(reference.values())) < 1e-4, text


def test_what_a_causal_student_cannot_answer_goes_to_the_teacher_and_a_bare_model_dir_is_refused(
        tmp_path: Path, text_student: Path) -> None:
    import shutil

    with gateway(tmp_path, text_student, _threshold(tmp_path / "t.json", 0.0, "mean_token_prob"),
                 policies=(CAUSAL_POLICY,)) as (url, _gw, fake, key):
        fake.set_reply("teacher text")
        c = client(url, key)
        two = c.chat.completions.create(model="toy-intent", n=2, max_tokens=3,
                                        messages=[{"role": "user", "content": _inputs(1)[0]}])
        assert two.model == "fake-teacher" and two.model_extra["distillgate"]["route"]["reason"] == "student_error"
        stream = c.chat.completions.create(model="toy-intent", stream=True, max_tokens=3, temperature=0,
                                           messages=[{"role": "user", "content": _inputs(1)[0]}])
        chunks = list(stream)
        assert chunks[-1].model_extra["distillgate"]["route"]["taken"] == "student"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    # the model folder alone (no run.json beside it: no label set, no prompt settings) is not a student
    bare = shutil.copytree(text_student / "model", tmp_path / "bare" / "weights")
    data = {"policy": str(write_policies(tmp_path / "p", CAUSAL_POLICY)), "db": str(tmp_path / "g.db"),
            "students": {"toy": str(bare)}}
    with pytest.raises(ConfigError, match=r"students\.toy"):
        config_from_data(data)
    # a run training again in place: its model/ is the last run's, its run.json the new one's -- not served
    again = shutil.copytree(text_student, tmp_path / "again")
    record = json.loads((again / "run.json").read_text())
    (again / "run.json").write_text(json.dumps({**record, "status": "running", "config": {
        **record["config"], "labels": LABELS}}))
    data["students"] = {"toy": str(again)}
    with pytest.raises(ConfigError, match="has not finished"):
        config_from_data(data)


def test_shadow_mode_compares_a_causal_students_labels_with_the_teachers(tmp_path: Path,
                                                                        label_student: Path) -> None:
    import httpx

    from test_gateway_routes import wait_shadow

    from fakes.fake_upstream import Behaviour

    texts = _inputs(10, seed=31)
    said = ["yes", "no", "maybe", "no", "yes", "no", "no", "maybe", "yes", "no"]  # the teacher, in order
    shadow = {"rate": 1.0, "window": 50, "min_samples": 5}
    with gateway(tmp_path, label_student, _threshold(tmp_path / "t.json", 0.0), policies=(CAUSAL_POLICY,),
                 shadow=shadow) as (url, gw, fake, key):
        c = client(url, key)
        labels = []
        for i, (text, teacher) in enumerate(zip(texts, said, strict=True)):
            fake.push(Behaviour.answer({"id": f"t{i}", "object": "chat.completion", "created": 0,
                                        "model": "fake-teacher", "usage": {"prompt_tokens": 1,
                                                                           "completion_tokens": 1,
                                                                           "total_tokens": 2},
                                        "choices": [{"index": 0, "finish_reason": "stop",
                                                     "message": {"role": "assistant", "content": teacher}}]}))
            labels.append(ask(c, text).choices[0].message.content)
            wait_shadow(gw, i + 1)  # one comparison at a time: each meets its own teacher answer
        metrics = httpx.get(url + "/metrics").text
    agreement = sum(a == b for a, b in zip(labels, said, strict=True)) / len(said)
    assert 0 < agreement < 1, labels  # both outcomes occur, so the figure is a real count
    assert f'distillgate_route_shadow_agreement{{model="toy-intent",slice="proj-a"}} {agreement}' in metrics
