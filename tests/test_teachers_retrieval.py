"""The retrieval-augmented teacher: the pool guard, the prompt shape, candidate narrowing, the embedding cache, and
a label request through a real gateway whose decision log records the examples shown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from _gateway_support import MAIN_POLICY, free_port, serve_in_thread, write_policies
from distillgate.errors import DatasetGuardError, UpstreamError, UserError
from distillgate.extraction.embed import HashingEmbedder
from distillgate.gateway.app import Gateway
from distillgate.gateway.screens import load_screens
from distillgate.gateway.upstreams import Router
from distillgate.keys import KeyStore
from distillgate.ledger.store import Store
from distillgate.policy import load_policies
from distillgate.teachers.base import Teacher, TeacherCard
from distillgate.teachers.retrieval import (
    ExamplePool,
    PoolIndex,
    PoolRow,
    RetrievalSettings,
    RetrievalTeacher,
    combine_with_votes,
    content_hash,
    narrow,
    retrieval_messages,
)

RECORDS = [
    {"id": "p1", "text": "my card never arrived", "label": "card_arrival"},
    {"id": "p2", "text": "when will my new card arrive", "label": "card_arrival"},
    {"id": "p3", "text": "the top up did not work", "label": "top_up_failed"},
    {"id": "p4", "text": "top up failed again today", "label": "top_up_failed"},
    {"id": "p5", "text": "I lost my card yesterday", "label": "lost_card"},
    {"id": "p6", "text": "how do I change my pin", "label": "change_pin"},
]


def pool(exclude: set[str] | None = None) -> ExamplePool:
    return ExamplePool.from_records(RECORDS, source="unit/pool", licence="CC0", id_key="id",
                                    exclude=exclude or set())


# -- the pool guard ------------------------------------------------------------------------------------------


def test_content_hash_ignores_case_and_spacing_only() -> None:
    assert content_hash("My  card\tnever arrived ") == content_hash("my card never arrived")
    assert content_hash("my card never arrived") != content_hash("my card never arrived!")


def test_excluded_rows_never_enter_the_pool() -> None:
    labelled = ["MY CARD NEVER ARRIVED", "top up failed   again today"]  # the rows being labelled, re-spaced
    p = pool({content_hash(t) for t in labelled})
    assert [r.example_id for r in p.rows] == ["p2", "p3", "p5", "p6"]
    assert p.excluded == 2
    p.assert_disjoint({content_hash(t) for t in labelled}, "rows being labelled")  # passes: they are gone


def test_assert_disjoint_names_the_clashing_rows() -> None:
    with pytest.raises(DatasetGuardError) as info:
        pool().assert_disjoint({content_hash("how do I change my PIN")}, "evaluation rows")
    assert "evaluation rows" in info.value.message and "p6" in info.value.message


def test_a_pool_with_nothing_left_is_an_error() -> None:
    with pytest.raises(UserError, match="empty after excluding 6"):
        pool({content_hash(r["text"]) for r in RECORDS})


def test_pool_records_need_text_and_label() -> None:
    with pytest.raises(UserError, match="record 1"):
        ExamplePool.from_records([{"text": "a", "label": "x"}, {"text": "b"}], source="s", licence="l")


def test_a_query_is_never_its_own_neighbour(tmp_path: Path) -> None:
    index = PoolIndex(pool(), HashingEmbedder(), embedder_id="hashing", cache_dir=tmp_path)
    found = index.nearest("my card never arrived", 3)
    assert "p1" not in [r.example_id for r, _ in found]  # identical text in the pool: skipped
    assert len(found) == 3
    assert [s for _, s in found] == sorted((s for _, s in found), reverse=True)  # nearest first


# -- the prompt --------------------------------------------------------------------------------------------------


def test_prompt_puts_neighbours_as_chat_turns_farthest_first_nearest_last() -> None:
    near = [PoolRow("a", "nearest text", "L1", "h1"), PoolRow("b", "middle text", "L2", "h2"),
            PoolRow("c", "far text", "L3", "h3")]
    msgs = retrieval_messages([{"role": "system", "content": "pick a label"},
                               {"role": "user", "content": "the question"}], near)
    assert msgs == [
        {"role": "system", "content": "pick a label"},
        {"role": "user", "content": "far text"}, {"role": "assistant", "content": "L3"},
        {"role": "user", "content": "middle text"}, {"role": "assistant", "content": "L2"},
        {"role": "user", "content": "nearest text"}, {"role": "assistant", "content": "L1"},
        {"role": "user", "content": "the question"},
    ]


def test_prompt_needs_a_final_user_message() -> None:
    with pytest.raises(UpstreamError) as info:
        retrieval_messages([{"role": "system", "content": "x"}], [])
    assert info.value.status == 400


def test_candidates_narrow_to_the_neighbours_labels_in_offered_order() -> None:
    near = [PoolRow("a", "t", "top_up_failed", "h"), PoolRow("b", "t", "card_arrival", "h2"),
            PoolRow("c", "t", "not_offered", "h3")]
    offered = ["card_arrival", "lost_card", "top_up_failed"]
    assert narrow(offered, near, "neighbours") == ["card_arrival", "top_up_failed"]
    assert narrow(offered, near, "all") == offered
    assert narrow(offered, [PoolRow("c", "t", "not_offered", "h3")], "neighbours") == offered  # nothing matched


# -- the embedding cache ------------------------------------------------------------------------------------


class CountingEmbedder(HashingEmbedder):
    def __init__(self) -> None:
        super().__init__()
        self.texts = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.texts += len(texts)
        return super().embed(texts)


def test_pool_embeddings_are_cached_on_disk_by_text_and_a_damaged_cache_is_recomputed(tmp_path: Path) -> None:
    emb = CountingEmbedder()
    first = PoolIndex(pool(), emb, embedder_id="hashing", cache_dir=tmp_path)
    assert emb.texts == 6 and not first.cache_hit and first.cache_path is not None
    again = PoolIndex(pool(), emb, embedder_id="hashing", cache_dir=tmp_path)
    assert again.cache_hit and emb.texts == 6
    assert np.array_equal(first.vectors, again.vectors)
    fewer = PoolIndex(pool({content_hash(RECORDS[0]["text"])}), emb, embedder_id="hashing", cache_dir=tmp_path)
    assert fewer.cache_hit and emb.texts == 6  # another exclusion set embeds nothing new
    assert np.array_equal(fewer.vectors, first.vectors[1:])
    other = PoolIndex(pool(), emb, embedder_id="other-embedder", cache_dir=tmp_path)
    assert not other.cache_hit and emb.texts == 12  # another embedder is another cache
    first.cache_path.write_bytes(b"not a numpy file")
    third = PoolIndex(pool(), emb, embedder_id="hashing", cache_dir=tmp_path)
    assert not third.cache_hit and emb.texts == 18 and np.array_equal(third.vectors, first.vectors)


# -- through the gateway --------------------------------------------------------------------------------------


class NearestLabelModel(Teacher):
    """A stand-in for the local model: puts most mass on the label of the last example turn (the nearest)."""

    def __init__(self) -> None:
        self.model_name = "local/tiny"
        self.prompts: list[list[dict[str, str]]] = []
        self.scored: list[list[str]] = []

    async def score_labels(self, messages: Any, labels: Sequence[str], *,
                           length_normalise: bool = False) -> tuple[dict[str, float], int]:
        self.prompts.append(list(messages))
        self.scored.append(list(labels))
        nearest = messages[-2]["content"] if len(messages) >= 3 else None
        raw = {lab: (5.0 if lab == nearest else 1.0) for lab in labels}
        total = sum(raw.values())
        return {k: v / total for k, v in raw.items()}, 10 * len(messages)

    async def chat_completion(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return {"id": "x", "object": "chat.completion", "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "free text"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}

    async def stream_chat_completion(self, body: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        yield {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}}

    def card(self) -> TeacherCard:
        return TeacherCard(model_id="local/tiny", backend="test")


def test_label_request_through_the_gateway_logs_the_examples_shown(tmp_path: Path) -> None:
    inner = NearestLabelModel()
    index = PoolIndex(pool(), HashingEmbedder(), embedder_id="hashing", cache_dir=tmp_path / "cache")
    teacher = RetrievalTeacher(inner, index, RetrievalSettings(k=3), model_name="local/knn")
    db = tmp_path / "gw.db"
    ks = KeyStore(db)
    key = ks.create("alice")[1]
    store = Store.open(db)
    policy = {**MAIN_POLICY, "approved_models": ["local/*"]}
    gateway = Gateway(policies=load_policies(write_policies(tmp_path / "p", policy)), store=store, keys=ks,
                      router=Router({}, local_models={"knn": "knn"}, local_loader=lambda spec: teacher),
                      screens=load_screens())
    port = free_port()
    headers = {"X-Policy-User": "alice", "X-Policy-Project": "proj-a", "X-Policy-Run": "r",
               "X-Policy-Output-Type": "labels"}
    try:
        with serve_in_thread(gateway, port):
            c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0,
                              default_headers=headers)
            resp = c.chat.completions.create(
                model="local/knn", max_tokens=8,
                messages=[{"role": "system", "content": "Pick one label."},
                          {"role": "user", "content": "top up failed"}],
                extra_body={"label_choices": ["card_arrival", "lost_card", "top_up_failed"]})
            choice = resp.choices[0]
            extra = choice.model_extra or {}
            assert choice.message.content == "top_up_failed"
            shown = extra["shown_examples"]
            assert len(shown) == 3 and set(shown) == {"p1", "p3", "p4"}
            assert extra["label_probs"]["lost_card"] == 0.0  # not a neighbour's label: not scored
            # the model's 5:1 for the nearest label times the vote shares 2/3 : 1/3 (vote_prior 1), renormalised
            assert extra["label_probs"]["top_up_failed"] == pytest.approx(10 / 11)
            prompt = inner.prompts[0]
            assert prompt[0] == {"role": "system", "content": "Pick one label."}
            assert [m["role"] for m in prompt] == ["system"] + ["user", "assistant"] * 3 + ["user"]
            assert prompt[5]["content"] == next(r["text"] for r in RECORDS if r["id"] == shown[-1])  # nearest last
            assert inner.scored == [["card_arrival", "top_up_failed"]]
            # two neighbours of one label: nothing to choose, the model is not run and no prompt token is spent
            teacher.settings = RetrievalSettings(k=2)
            one = c.chat.completions.create(
                model="local/knn", max_tokens=8, messages=[{"role": "user", "content": "top up failed"}],
                extra_body={"label_choices": ["card_arrival", "top_up_failed"]})
            assert one.choices[0].message.content == "top_up_failed" and len(inner.prompts) == 1
            assert (one.choices[0].model_extra or {})["label_probs"] == {"card_arrival": 0.0, "top_up_failed": 1.0}
            assert one.usage is not None and one.usage.prompt_tokens == 0 and teacher.single_candidate == 1
            free = c.chat.completions.create(model="local/knn", max_tokens=8,
                                             messages=[{"role": "user", "content": "hello"}],
                                             extra_headers={"X-Policy-Output-Type": "summaries"})
            assert free.choices[0].message.content == "free text"  # no label_choices: the model as is
            settled = list(store.entries(kind="settlement"))
            assert settled[0].body["extra"]["shown_examples"] == [shown]
            assert len(settled[1].body["extra"]["shown_examples"][0]) == 2  # the examples shown are logged anyway
            assert "shown_examples" not in (settled[2].body.get("extra") or {})
    finally:
        store.close()
        ks.close()


def test_card_says_what_the_teacher_is(tmp_path: Path) -> None:
    index = PoolIndex(pool({content_hash(RECORDS[0]["text"])}), HashingEmbedder(), embedder_id="hashing")
    card = RetrievalTeacher(NearestLabelModel(), index, RetrievalSettings(k=4)).card().as_dict()
    assert card["backend"] == "retrieval+test"
    method = card["method"]
    assert method["k"] == 4 and method["candidates"] == "neighbours"
    assert method["pool"]["licence"] == "CC0" and method["pool"]["rows"] == 5 and method["pool"]["excluded_rows"] == 1
    assert "retrieval" in method["strength"]


def test_k_is_checked() -> None:
    index = PoolIndex(pool(), HashingEmbedder(), embedder_id="hashing")
    with pytest.raises(UserError, match="k must be"):
        RetrievalTeacher(NearestLabelModel(), index, RetrievalSettings(k=0))


def test_the_neighbours_vote_weighs_the_models_distribution() -> None:
    near = [PoolRow("a", "x", "card", "h1"), PoolRow("b", "y", "card", "h2"), PoolRow("c", "z", "pin", "h3"),
            PoolRow("d", "w", "card", "h4")]
    model = {"card": 0.4, "pin": 0.6}
    assert combine_with_votes(model, near, 0.0) == model  # beta 0: the model alone
    once = combine_with_votes(model, near, 1.0)  # 0.4 * 3/4 against 0.6 * 1/4
    assert once == pytest.approx({"card": 0.3 / 0.45, "pin": 0.15 / 0.45})
    assert combine_with_votes(model, near, 2.0)["card"] > once["card"]
    # a scored label no neighbour carries (candidates: all) counts half a vote, not zero
    wide = combine_with_votes({"card": 0.1, "pin": 0.1, "fee": 0.8}, near, 1.0)
    assert wide["fee"] == pytest.approx(0.8 * 0.5 / (0.1 * 3 + 0.1 * 1 + 0.8 * 0.5))
    with pytest.raises(UserError, match="vote_prior"):
        RetrievalSettings(vote_prior=-1).check()
