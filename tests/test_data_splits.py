"""Near-duplicate clustering, leakage-safe splits (groups, clusters, time, holdout, golden) and the leakage check."""

from __future__ import annotations

import random

import pytest

from _data_support import banking_rows
from distillgate.data.config import DedupConfig, parse_config
from distillgate.data.dedup import NearIndex, exact_groups, jaccard, near_duplicate_clusters, shingles
from distillgate.data.guard import ensure_trainable
from distillgate.data.leakage import leakage_check
from distillgate.data.pipeline import process
from distillgate.data.schema import Row
from distillgate.errors import DatasetGuardError, UserError


def test_shingles_and_exact_groups():
    assert shingles("My card, my CARD!", 2) == ["my card", "card my", "my card"]
    assert shingles("Hi", 2) == ["hi"]
    assert shingles("???", 2) == ["???"]
    assert exact_groups(["Lost card", "lost   CARD?", "new card"]) == [0, 0, 2]


def test_clusters_are_verified_with_exact_jaccard():
    cfg = DedupConfig(threshold=0.8)
    base = "please tell me how i can activate the new card that arrived today in the post"
    texts = [base, base + " thanks", "completely different words about exchange rates and fees", base.upper()]
    result = near_duplicate_clusters(texts, cfg)
    sim = jaccard(set(shingles(texts[0], 2)), set(shingles(texts[1], 2)))
    assert sim >= 0.8
    assert result.clusters == [0, 0, 2, 0]


def test_near_index_finds_planted_neighbours_on_banking77():
    rows = banking_rows(limit=2000)
    texts = [r["text"] for r in rows]
    index = NearIndex(texts, DedupConfig())
    queries = [texts[5] + " please", "zebra quantum lighthouse"]
    found = index.neighbours(queries)
    assert found[0] and found[0][0].index == 5 and found[0][0].similarity >= 0.8
    assert found[1] == []


def _rows(n: int, *, groups: int | None = None, seed: int = 0) -> list[Row]:
    rng = random.Random(seed)
    labels = ["card_arrival", "top_up_failed", "exchange_rate", "lost_or_stolen_card"]
    vocab = [w for r in banking_rows(limit=500) for w in r["text"].lower().split()]
    out = []
    for i in range(n):
        text = " ".join(rng.choices(vocab, k=rng.randint(8, 14)))
        out.append(Row(row_id=f"r{i}:0", input_id=f"r{i}", input=text,
                       output_raw=f'{{"type": "{labels[i % 4]}"}}',
                       source_group=f"g{i % groups}" if groups else None,
                       source_timestamp=f"2024-01-{1 + i % 28:02d}T00:00:00Z"))
    return out


def test_groups_and_clusters_never_cross_splits():
    rows = _rows(600, groups=150)
    # plant near-duplicates of 30 rows in other groups
    for i in range(30):
        rows.append(Row(row_id=f"d{i}:0", input_id=f"d{i}", input=rows[i].input + " ok",
                        output_raw=rows[i].output_raw, source_group=f"other{i}"))
    cfg = parse_config({"filters": {"near_duplicates": False}, "split": {"holdout": {"enabled": False}}})
    report = process(rows, cfg)
    assert report.filters.passed == len(rows)
    split_of_group: dict[str, set[str]] = {}
    split_of_cluster: dict[str, set[str]] = {}
    for r in rows:
        split_of_group.setdefault(r.source_group or "", set()).add(r.split or "")
        split_of_cluster.setdefault(r.dup_cluster or "", set()).add(r.split or "")
    assert all(len(s) == 1 for s in split_of_group.values())
    assert all(len(s) == 1 for s in split_of_cluster.values())
    assert {r.split for r in rows} >= {"train", "val", "test"}
    assert report.leakage.clean


def test_random_split_leaks_where_ours_does_not():
    rows = _rows(400)
    for i in range(100):
        rows.append(Row(row_id=f"d{i}:0", input_id=f"d{i}", input=rows[i].input + " thanks",
                        output_raw=rows[i].output_raw))
    cfg = parse_config({"filters": {"near_duplicates": False}, "split": {"holdout": {"enabled": False},
                                                                         "golden": {"fraction": 0.0}}})
    process(rows, cfg)
    assert leakage_check(rows).clean
    rng = random.Random(1)
    for r in rows:
        r.split = "test" if rng.random() < 0.2 else "train"
    leaked = leakage_check(rows)
    assert len(leaked.hits) > 5
    assert all(h.similarity >= 0.8 for h in leaked.hits)


def test_time_split_puts_oldest_in_train():
    rows = _rows(300)
    cfg = parse_config({"split": {"by_time": True, "holdout": {"enabled": False}, "golden": {"fraction": 0.0},
                                  "ratios": {"train": 0.7, "test": 0.3}}})
    process(rows, cfg)
    latest_train = max(r.source_timestamp for r in rows if r.split == "train")
    earliest_test = min(r.source_timestamp for r in rows if r.split == "test")
    assert latest_train <= earliest_test
    rows[0].source_timestamp = None
    with pytest.raises(UserError, match="timestamp"):
        process(rows, cfg)


def test_holdout_takes_hard_cases():
    rows = _rows(200)
    rows[0].output_raw = '{"type": "very_rare_label"}'
    rows[1].tags = ["adversarial"]
    rows[2].output_raw = "I'm sorry, but I can't help with that."
    rows[3].input = "card"
    rows[4].label_probs = {"card_arrival": 0.3, "top_up_failed": 0.25}
    cfg = parse_config({"split": {"golden": {"fraction": 0.0}}})
    report = process(rows, cfg)
    assert [r.split_reason for r in rows[:5]] == ["rare_label", "adversarial", "cannot_answer", "short_input",
                                                   "low_confidence"]
    assert all(r.split == "holdout" for r in rows[:5])
    assert report.split.holdout_reasons["rare_label"] == 1


def test_golden_fraction_and_guard():
    rows = _rows(400)
    process(rows, parse_config({"split": {"golden": {"fraction": 0.1}}}))
    golden = [r for r in rows if r.split == "golden"]
    assert 15 <= len(golden) <= 70
    train = [r.to_record() for r in rows if r.split in ("train", "val")]
    assert ensure_trainable(train) == len(train)
    with pytest.raises(DatasetGuardError, match="golden"):
        ensure_trainable([*train, golden[0].to_record()])
    with pytest.raises(DatasetGuardError):
        ensure_trainable(train, golden_ids=[train[0]["row_id"]])


def test_hashed_shingles_match_string_shingles_and_exhaustive_clusters():
    from distillgate.data.dedup import sketch

    texts = [r["text"] for r in banking_rows(limit=1500)] + ["Hi", "!!!", "card", "two words"]
    cfg = DedupConfig(threshold=0.6)
    sk = sketch(texts, cfg)
    string_sets = [set(shingles(t, cfg.ngram)) for t in texts]
    assert [len(sk.shingle_set(i)) for i in range(len(texts))] == [len(s) for s in string_sets]
    # exhaustive single-linkage clustering as the reference
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(len(texts)):
        for j in range(i):
            if jaccard(string_sets[i], string_sets[j]) >= cfg.threshold:
                ri, rj = find(i), find(j)
                parent[max(ri, rj)] = min(ri, rj)
    expected = [find(i) for i in range(len(texts))]
    got = near_duplicate_clusters(texts, cfg).clusters
    agree = sum(1 for a, b in zip(expected, got, strict=True) if a == b) / len(texts)
    assert agree >= 0.995, agree
    assert sum(1 for a, b in zip(expected, got, strict=True) if a != b) <= 3
