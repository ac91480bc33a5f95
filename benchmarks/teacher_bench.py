"""Benchmark the local teacher: load times, tokens/s (single, batch 8, batch 32), shared-prefix KV-cache speedup,
and banking77 zero-/few-shot accuracy by label scoring on a fixed random sample of the test set.

    python benchmarks/teacher_bench.py [--rows 500] [--accuracy-budget-s 1800]
        [--parts load,throughput,prefix,accuracy] [--batches 1,8,32]

Prints a table and writes benchmarks/results/teacher_bench.json, merging into the figures already there (so parts
can be run separately) and saving after every step (so a run cut short still leaves its figures). Uses at most 2
CPU threads.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from distillgate.teachers.engine import LocalModel, SamplingParams  # noqa: E402
from distillgate.teachers.loading import DEFAULT_MODEL, load_model, resolve_spec  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "teacher_bench.json"
DATA = ROOT / "data" / "banking77"


def read_rows(name: str) -> list[dict[str, str]]:
    with (DATA / name).open(newline="") as fh:
        return list(csv.DictReader(fh))


def spaced(category: str) -> str:
    return category.replace("_", " ")


def taxonomy_system(categories: list[str]) -> str:
    lines = "\n".join(f"- {spaced(c)}" for c in categories)
    return ("You classify customer messages to a bank into exactly one intent.\nIntents:\n" + lines +
            "\nReply with the intent only, exactly as written in the list.")


def save(report: dict[str, Any]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))


def measure_loads(report: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source = resolve_spec(DEFAULT_MODEL)
        first = load_model(source, cache_dir=Path(tmp))
        second = load_model(source, cache_dir=Path(tmp))
        assert not first.from_cache and second.from_cache
        report["load_seconds"] = {"first_dequantise_and_cache": round(first.load_seconds, 2),
                                  "second_from_disk_cache": round(second.load_seconds, 2),
                                  "speedup": round(first.load_seconds / second.load_seconds, 2)}
        print(f"load: first (dequantise + write cache) {first.load_seconds:.1f}s, "
              f"second (from cache) {second.load_seconds:.1f}s")


def throughput(engine: LocalModel, prompts: list[list[dict[str, str]]], batch: int, tokens: int) -> dict[str, Any]:
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    # a stop-free greedy run; rows that hit EOS early are counted by the tokens they produced
    started = time.perf_counter()
    gens = engine.generate(prompts[:batch], params, prefix_cache=False)
    elapsed = time.perf_counter() - started
    produced = sum(g.completion_tokens for g in gens)
    return {"batch": batch, "completion_tokens": produced, "seconds": round(elapsed, 2),
            "tokens_per_s": round(produced / elapsed, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--accuracy-budget-s", type=float, default=1800.0)
    parser.add_argument("--parts", default="load,throughput,prefix,accuracy")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--prefix-rows", type=int, default=8)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    torch.set_num_threads(2)
    report: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    report.setdefault("runs", []).append(f"parts={args.parts}: {os.cpu_count()} CPUs, torch threads 2, "
                                         f"load avg at start {os.getloadavg()[0]:.1f}")
    report["model"] = DEFAULT_MODEL
    if "load" in parts:
        measure_loads(report)
        save(report)
    loaded = load_model(resolve_spec(DEFAULT_MODEL))
    engine = LocalModel(loaded.model, loaded.tokenizer, loaded.card, model_name=DEFAULT_MODEL)
    report["card"] = loaded.card.as_dict()

    categories: list[str] = json.loads((DATA / "categories.json").read_text())
    test = read_rows("test.csv")
    train = read_rows("train.csv")
    rng = random.Random(0)
    sample = rng.sample(test, args.rows)
    user_prompts = [[{"role": "user", "content": r["text"]}] for r in sample[:32]]

    # throughput, no shared prefix (plain user questions, chat template only)
    throughput_rows = {row["batch"]: row for row in report.get("throughput", [])}
    for batch in [int(b) for b in args.batches.split(",")] if "throughput" in parts else []:
        row = throughput(engine, user_prompts, batch, args.max_tokens)
        throughput_rows[batch] = row
        report["throughput"] = [throughput_rows[b] for b in sorted(throughput_rows)]
        print(f"throughput batch {batch:>2}: {row['completion_tokens']} tokens in {row['seconds']}s "
              f"= {row['tokens_per_s']} tok/s")
        save(report)

    # shared-prefix KV cache: 8 rows behind the 77-intent taxonomy
    system = {"role": "system", "content": taxonomy_system(categories)}
    prefixed = [[system, {"role": "user", "content": r["text"]}] for r in sample[:args.prefix_rows]]
    params = SamplingParams(max_tokens=4, temperature=0.0)
    timings: dict[Any, float] = {}
    outputs: dict[Any, Any] = {}
    for use in (False, True) if "prefix" in parts else ():
        engine.clear_prefix_cache()  # "with": the prefix is computed once in this call (cold)
        started = time.perf_counter()
        outputs[use] = engine.generate(prefixed, params, prefix_cache=use)
        timings[use] = time.perf_counter() - started
    if "prefix" in parts:
        started = time.perf_counter()  # warm: the taxonomy prefix is kept from the call before
        warm = engine.generate(prefixed, params)
        timings["warm"] = time.perf_counter() - started
        outputs["warm"] = warm
        prefix_report(report, outputs, timings)
        label_prefix_report(report, engine, prefixed, [spaced(c) for c in categories])
    if "accuracy" in parts:
        accuracy(report, engine, categories, train, sample, system, args)
    print(f"wrote {RESULTS}")


def prefix_report(report: dict[str, Any], outputs: dict[Any, Any], timings: dict[Any, float]) -> None:
    same = [a.token_ids == b.token_ids == c.token_ids
            for a, b, c in zip(outputs[False], outputs[True], outputs["warm"], strict=True)]
    report["prefix_cache"] = {"rows": len(outputs[True]), "prompt_tokens_per_row": outputs[True][0].prompt_tokens,
                              "max_tokens": 4, "seconds_without": round(timings[False], 2),
                              "seconds_with": round(timings[True], 2),
                              "seconds_with_kept_prefix": round(timings["warm"], 2),
                              "speedup": round(timings[False] / timings[True], 2),
                              "speedup_kept_prefix": round(timings[False] / timings["warm"], 2),
                              "identical_outputs": all(same)}
    print(f"prefix cache, generation ({len(outputs[True])} rows x {outputs[True][0].prompt_tokens} prompt tokens, "
          f"4 new): {timings[False]:.1f}s without, {timings[True]:.1f}s with (x{timings[False] / timings[True]:.2f}), "
          f"{timings['warm']:.1f}s with the prefix kept from an earlier call (x{timings[False] / timings['warm']:.2f}),"
          f" identical={all(same)}")
    save(report)


def label_prefix_report(report: dict[str, Any], engine: LocalModel, prompts: list[Any], labels: list[str]) -> None:
    """Label scoring of the same rows over all 77 intents, without and with the (kept) taxonomy prefix."""
    started = time.perf_counter()
    plain = engine.score_labels_batch(prompts, labels, prefix_cache=False)
    without = time.perf_counter() - started
    engine.score_labels_batch(prompts[:1], labels)  # keeps the prefix
    started = time.perf_counter()
    cached = engine.score_labels_batch(prompts, labels)
    with_kept = time.perf_counter() - started
    diff = max(abs(a[k] - b[k]) for a, b in zip(plain, cached, strict=True) for k in labels)
    report["prefix_cache_label_scoring"] = {
        "rows": len(prompts), "labels": len(labels), "seconds_without": round(without, 2),
        "seconds_with_kept_prefix": round(with_kept, 2), "speedup": round(without / with_kept, 2),
        "max_abs_probability_difference": diff}
    print(f"prefix cache, label scoring ({len(prompts)} rows x {len(labels)} labels): {without:.1f}s without, "
          f"{with_kept:.1f}s with the kept prefix (x{without / with_kept:.2f}); max |dp| {diff:.1e}")
    save(report)


def accuracy(report: dict[str, Any], engine: LocalModel, categories: list[str], train: list[dict[str, str]],
             sample: list[dict[str, str]], system: dict[str, str], args: argparse.Namespace) -> None:
    # banking77 accuracy by label scoring
    labels = [spaced(c) for c in categories]
    shots_rows = random.Random(1).sample(train, args.shots)
    few: list[dict[str, str]] = [system]
    for r in shots_rows:
        few += [{"role": "user", "content": r["text"]}, {"role": "assistant", "content": spaced(r["category"])}]
    # one forward pass per row and prompt gives both scorings: the sum of the label's token log-probabilities
    # (the default) and their mean (length-normalised: long intent names are not penalised for their length)
    keys = [f"{shot}_{norm}" for shot in ("zero_shot", "few_shot") for norm in ("sum", "mean")]
    correct = dict.fromkeys(keys, 0)
    done = 0
    started = time.perf_counter()
    chunk = 10
    for at in range(0, len(sample), chunk):
        rows = sample[at:at + chunk]
        for name, head in (("zero_shot", [system]), ("few_shot", few)):
            prompts = [[*head, {"role": "user", "content": r["text"]}] for r in rows]
            sums, lengths = engine.label_logprob_sums(prompts, labels)
            norm = torch.tensor(lengths, dtype=torch.float32)
            for r, scores in zip(rows, sums, strict=True):
                gold = spaced(r["category"])
                correct[f"{name}_sum"] += labels[int(scores.argmax())] == gold
                correct[f"{name}_mean"] += labels[int((scores / norm).argmax())] == gold
        done += len(rows)
        elapsed = time.perf_counter() - started
        report["banking77"] = {
            "sample": f"random.Random(0).sample(test, {args.rows}); first {done} rows scored",
            "rows_scored": done, "shots": args.shots, "seconds": round(elapsed, 1),
            "seconds_per_row_both_prompts": round(elapsed / done, 2),
            "zero_shot_accuracy": round(correct["zero_shot_sum"] / done, 4),
            "few_shot_accuracy": round(correct["few_shot_sum"] / done, 4),
            "zero_shot_accuracy_length_normalised": round(correct["zero_shot_mean"] / done, 4),
            "few_shot_accuracy_length_normalised": round(correct["few_shot_mean"] / done, 4),
            "chance": round(1 / len(labels), 4),
            "prefix_cache": dict(engine.prefix_stats),
            "prompt": "system: 77-intent list (underscores as spaces) + 'Reply with the intent only'; "
                      "label = intent text + <|im_end|>; few-shot adds user/assistant example turns; "
                      "score = sum (default) or mean of the label's token log-probabilities",
        }
        save(report)
        print(f"  {done} rows: " + ", ".join(f"{k} {v / done:.3f}" for k, v in correct.items())
              + f" ({elapsed / done:.2f}s/row)", flush=True)
        if elapsed > args.accuracy_budget_s:
            print(f"accuracy budget of {args.accuracy_budget_s}s spent after {done} rows")
            break
    acc = report["banking77"]
    print(f"banking77 ({done} rows): zero-shot {acc['zero_shot_accuracy']} (length-normalised "
          f"{acc['zero_shot_accuracy_length_normalised']}), few-shot {acc['few_shot_accuracy']} (length-normalised "
          f"{acc['few_shot_accuracy_length_normalised']}), chance {acc['chance']}")


if __name__ == "__main__":
    main()
