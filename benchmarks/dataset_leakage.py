"""banking77 leakage: test rows with a near-duplicate in train (Jaccard >= 0.8), and a random split vs ours.

1. The published split: how many of the 3,080 test rows have a train neighbour at Jaccard >= 0.8 (word bigram
   shingles, the dataset builder's default; word-set Jaccard shown too).
2. Pool train + test (13,083 rows) and split 80/10/10 two ways: a seeded random row split, and distillgate's
   cluster-aware split (near-duplicate clusters kept whole; near-duplicate filter, holdout and golden off so both
   splits hold the same rows). Count the test rows with a train/val neighbour.

Prints a table and writes benchmarks/results/dataset_leakage.json.
"""

from __future__ import annotations

import csv
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from distillgate.data.config import DedupConfig, parse_config  # noqa: E402
from distillgate.data.dedup import NearIndex, jaccard, shingles  # noqa: E402
from distillgate.data.leakage import leakage_check  # noqa: E402
from distillgate.data.pipeline import process  # noqa: E402
from distillgate.data.schema import Row  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "dataset_leakage.json"


def _read(name: str) -> list[dict[str, str]]:
    with (ROOT / "data" / "banking77" / name).open(newline="") as fh:
        return list(csv.DictReader(fh))


def _count(train: list[str], test: list[str], cfg: DedupConfig) -> int:
    return sum(1 for hits in NearIndex(train, cfg).neighbours(test) if hits)


def _exact_count(train: list[str], test: list[str], ngram: int) -> int:
    """Reference count without LSH: every train row sharing a shingle is compared (inverted index)."""
    sets = [set(shingles(t, ngram)) for t in train]
    index: dict[str, list[int]] = {}
    for i, s in enumerate(sets):
        for sh in s:
            index.setdefault(sh, []).append(i)
    count = 0
    for text in test:
        mine = set(shingles(text, ngram))
        seen = {j for sh in mine for j in index.get(sh, ())}
        if any(jaccard(mine, sets[j]) >= 0.8 for j in seen):
            count += 1
    return count


def main() -> None:
    train, test = _read("train.csv"), _read("test.csv")
    out: dict[str, object] = {"train_rows": len(train), "test_rows": len(test), "threshold": 0.8}
    t0 = time.perf_counter()
    published = {}
    for name, ngram in (("word_bigrams", 2), ("word_sets", 1)):
        published[name] = _count([r["text"] for r in train], [r["text"] for r in test],
                                 DedupConfig(ngram=ngram, threshold=0.8))
    out["published_split_test_rows_with_train_neighbour"] = published
    exact = _exact_count([r["text"] for r in train], [r["text"] for r in test], 2)
    out["published_split_exact_reference_word_bigrams"] = exact

    pooled = [*train, *test]
    def rows() -> list[Row]:
        return [Row(row_id=f"b-{i}:0", input_id=f"b-{i}", input=r["text"],
                    output_raw=json.dumps({"category": r["category"]})) for i, r in enumerate(pooled)]

    ratios = {"train": 0.8, "val": 0.1, "test": 0.1}
    comparison = []
    for seed in (0, 1, 2):
        rnd = rows()
        rng = random.Random(seed)
        for r in rnd:
            u = rng.random()
            r.split = "train" if u < 0.8 else "val" if u < 0.9 else "test"
            r.filter_status = "pass"
        rand_report = leakage_check(rnd, DedupConfig())
        ours = rows()
        cfg = parse_config({"filters": {"near_duplicates": False, "exact_duplicates": False, "length": None,
                                        "disagreement": None},
                            "split": {"seed": seed, "ratios": ratios, "holdout": {"enabled": False},
                                      "golden": {"fraction": 0.0}}})
        report = process(ours, cfg)
        n_test_rand = sum(1 for r in rnd if r.split == "test")
        n_test_ours = sum(1 for r in ours if r.split == "test")
        comparison.append({
            "seed": seed,
            "random": {"test_rows": n_test_rand, "leaking": len(rand_report.hits)},
            "ours": {"test_rows": n_test_ours, "leaking": len(report.leakage.hits),
                     "clusters": report.filters.clusters,
                     "train_rows": sum(1 for r in ours if r.split == "train")},
        })
    # the builder's defaults: near-duplicates dropped, holdout and golden on
    defaults = rows()
    default_report = process(defaults, parse_config({}))
    out["random_vs_ours"] = comparison
    out["defaults"] = {"splits": default_report.split.counts, "reasons": default_report.filters.reasons,
                       "protected_rows_leaking": len(default_report.leakage.hits)}
    out["seconds"] = round(time.perf_counter() - t0, 1)

    print(f"banking77 published split: {published['word_bigrams']} of {len(test)} test rows have a train "
          f"neighbour at Jaccard >= 0.8 on word bigrams ({published['word_bigrams'] / len(test):.1%}); "
          f"{published['word_sets']} on word sets ({published['word_sets'] / len(test):.1%}); "
          f"exhaustive check (no LSH) on word bigrams: {exact}")
    print(f"\npooled {len(pooled)} rows, 80/10/10 split, test rows with a train/val neighbour at Jaccard >= 0.8:")
    print(f"{'seed':>4}  {'random: test':>12} {'leaking':>8} {'share':>7}   {'ours: test':>10} {'leaking':>8}"
          f" {'clusters':>9}")
    for c in comparison:
        rnd_, ours_ = c["random"], c["ours"]
        print(f"{c['seed']:>4}  {rnd_['test_rows']:>12} {rnd_['leaking']:>8} "
              f"{rnd_['leaking'] / rnd_['test_rows']:>7.1%}   {ours_['test_rows']:>10} {ours_['leaking']:>8}"
              f" {ours_['clusters']:>9}")
    print(f"\nbuilder defaults (near-duplicates dropped, holdout + golden): splits {out['defaults']['splits']}, "
          f"protected rows leaking: {out['defaults']['protected_rows_leaking']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)} ({out['seconds']} s)")


if __name__ == "__main__":
    main()
