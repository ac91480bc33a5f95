"""Recipes end to end on tiny real models: loss falls, agreement with a fixed teacher rises, guard, resume, CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from _train_support import LABELS, freeze_rows, save_model, toy_rows, write_jsonl
from distillgate.errors import ConfigError, DatasetGuardError, IntegrityError
from distillgate.train import load_rows, parse_config, run_recipe
from distillgate.train.config import ModelSource, PromptSettings
from distillgate.train.encode import answer_ids, collate, make_examples, prompt_ids, sparse_targets
from distillgate.train.labels import score_labels
from distillgate.train.loop import StepResult, train
from distillgate.train.losses import divergence
from distillgate.train.student import decoder_and_head, load_causal_lm

PROMPT = {"template": "say the word {input}", "system": "classify"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models")
    save_model(d / "teacher", seed=1, layers=4)
    save_model(d / "student", seed=2, layers=2)
    return d


def _config(tmp: Path, models: Path, **over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"recipe": "sft", "dataset": str(tmp / "ds"), "output_dir": str(tmp / "out"),
                           "student": {"model": {"path": str(models / "student")}}, "prompt": PROMPT,
                           "epochs": 2, "batch_size": 8, "lr": 3e-3, "log_every": 1, "threads": 1}
    doc.update(over)
    return doc


def _label_agreement(model_dir: Path, rows: list[dict[str, Any]]) -> float:
    model, tok = load_causal_lm(ModelSource(path=str(model_dir)))
    lt = [answer_ids(tok, name) for name in LABELS]
    hits = 0
    with torch.no_grad():
        for row in rows:
            pred = LABELS[int(score_labels(model, prompt_ids(tok, PromptSettings(**PROMPT), row["input"]), lt)
                              .argmax())]
            hits += pred == row["label"]
    return hits / len(rows)


def _rule_teacher(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A fixed teacher over the label set: 0.8 on the rule's label, 0.1 on each other label."""
    return [{**r, "label_probs": {name: 0.8 if name == r["label"] else 0.1 for name in LABELS}} for r in rows]


def test_kd_on_label_distribution_raises_agreement_with_the_teacher(tmp_path: Path, models: Path) -> None:
    freeze_rows(tmp_path, _rule_teacher(toy_rows(96)))
    held_out = toy_rows(40, seed=7)
    before = _label_agreement(models / "student", held_out)
    cfg = parse_config(_config(tmp_path, models, recipe="kd", labels=LABELS, epochs=7, lr=1e-2,
                               kd={"target": "label_probs", "divergence": "fkl", "temperature": 1.0}))
    result = run_recipe(cfg)
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    after = _label_agreement(result.model_dir, held_out)
    assert after >= 0.9 and after > before + 0.3, (before, after)


def test_sft_loss_falls_and_saves_a_from_pretrained_model(tmp_path: Path, models: Path) -> None:
    freeze_rows(tmp_path, toy_rows(48))
    result = run_recipe(parse_config(_config(tmp_path, models, epochs=5, lr=1e-2)))
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0]
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert reloaded.config.num_hidden_layers == 2
    record = json.loads(result.record_path.read_text())
    assert record["status"] == "finished" and record["dataset"]["n_rows"] == 48
    assert record["config"]["prompt"]["system"] == "classify"
    assert record["dataset"]["rows_sha256"] and record["tokens_per_s"] > 0
    assert not list((tmp_path / "out" / "checkpoints").glob("*.pt"))


def test_kd_logits_with_layer_subset_student_moves_towards_the_teacher(tmp_path: Path, models: Path) -> None:
    freeze_rows(tmp_path, toy_rows(32))
    teacher, tok = load_causal_lm(ModelSource(path=str(models / "teacher")))
    examples, _ = make_examples(toy_rows(32), tok, PromptSettings(**PROMPT), max_length=64)
    batch = collate(examples, tok.pad_token_id)

    def kl_to_teacher(student: Any) -> float:
        with torch.no_grad():
            s = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.rows, batch.cols]
            t = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.rows, batch.cols]
        return float(divergence(torch.log_softmax(s, -1), torch.log_softmax(t, -1), "fkl").mean())

    from distillgate.train.config import LayerSubset
    from distillgate.train.student import layer_subset_student

    start = layer_subset_student(teacher, LayerSubset(every=2))
    assert start.config.num_hidden_layers == 2
    cfg = parse_config(_config(tmp_path, models, recipe="kd", teacher={"path": str(models / "teacher")},
                               student={"from_teacher": {"every": 2}}, epochs=6, lr=5e-3,
                               kd={"target": "logits", "divergence": "fkl", "temperature": 1.0}))
    result = run_recipe(cfg)
    losses = [h["kd"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0]
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert kl_to_teacher(trained) < 0.5 * kl_to_teacher(start)
    assert json.loads(result.record_path.read_text())["student"]["layer_subset"] == [0, 2]


def test_kd_top_logprobs_with_lora(tmp_path: Path, models: Path) -> None:
    rows = toy_rows(24)
    for r in rows:  # an API teacher's stored top-3 per answer token (one token per label here)
        others = [name for name in LABELS if name != r["output"]]
        r["top_logprobs"] = [[{"token": r["output"], "logprob": -0.2}, {"token": others[0], "logprob": -2.5},
                              {"token": "no-such-token", "logprob": -3.0}]]
    freeze_rows(tmp_path, rows)
    cfg = parse_config(_config(tmp_path, models, recipe="kd", epochs=3,
                               student={"model": {"path": str(models / "student")}, "lora": {"r": 4, "alpha": 8}},
                               kd={"target": "top_logprobs", "divergence": "jsd", "hard_weight": 0.1}))
    result = run_recipe(cfg)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    record = json.loads(result.record_path.read_text())
    assert record["student"]["trainable"] < record["student"]["parameters"] / 2
    assert record["encoding"]["topk_misaligned"] == 0


def test_guard_refuses_test_and_golden_rows_before_loading_a_model(tmp_path: Path, models: Path) -> None:
    held = toy_rows(2, split="test", seed=3) + toy_rows(2, split="golden", seed=4)
    freeze_rows(tmp_path, toy_rows(4) + held)
    no_model = {"student": {"model": {"path": "/nonexistent"}}}
    # a rows file naming the version's test and golden rows, as they are
    write_jsonl(tmp_path / "rows.jsonl", toy_rows(4) + held)
    with pytest.raises(DatasetGuardError, match="4 protected row"):
        run_recipe(parse_config(_config(tmp_path, models, rows=str(tmp_path / "rows.jsonl"), **no_model)))


def test_train_refuses_a_golden_row_smuggled_into_a_row_file(tmp_path: Path, models: Path) -> None:
    golden = toy_rows(1, split="golden", seed=4)[0]
    freeze_rows(tmp_path, [*toy_rows(4), golden])
    no_model = {"student": {"model": {"path": "/nonexistent"}}}
    # renamed, relabelled as a training row: refused by the hash of its input
    smuggled = {**golden, "row_id": "r0-99", "split": "train"}
    write_jsonl(tmp_path / "rows.jsonl", [*toy_rows(4), smuggled])
    with pytest.raises(DatasetGuardError, match="golden/test/holdout input"):
        run_recipe(parse_config(_config(tmp_path, models, rows=str(tmp_path / "rows.jsonl"), **no_model)))
    # a row the version does not hold (or holds with another answer) refuses the file
    forged = {**toy_rows(1)[0], "output": "maybe", "label": "maybe"}
    write_jsonl(tmp_path / "rows.jsonl", [forged])
    with pytest.raises(DatasetGuardError, match="do not match frozen version"):
        run_recipe(parse_config(_config(tmp_path, models, rows=str(tmp_path / "rows.jsonl"), **no_model)))
    # a free rows file without a frozen version is no training input at all
    with pytest.raises(DatasetGuardError, match="not part of a frozen dataset version"):
        run_recipe(parse_config(_config(tmp_path, models, dataset=None, rows=str(tmp_path / "rows.jsonl"),
                                        **no_model)))
    # the version's own rows.parquet (it holds the golden row) is accepted: the golden row stays out
    from distillgate.data.guard import training_input
    from distillgate.data.versions import resolve_version

    parquet = resolve_version(tmp_path / "ds") / "rows.parquet"
    got = training_input(tmp_path / "ds", rows_file=parquet).rows
    assert sorted(r["row_id"] for r in got) == sorted(r["row_id"] for r in toy_rows(4))


def test_a_corrected_label_is_the_training_target(tmp_path: Path, models: Path) -> None:
    """A reviewer corrected a plain-label row (output still holds the teacher's label): every recipe learns the
    correction -- sft's answer tokens, kd's label distribution and kd's top-k/logit targets."""
    from distillgate.data import review
    from distillgate.data.guard import training_input
    from distillgate.data.store import WorkingCopy
    from distillgate.data.versions import freeze

    rows = toy_rows(6)
    rows[0].update(output="yes", label="yes", label_probs={"yes": 0.9, "no": 0.05, "maybe": 0.05},
                   top_logprobs=[[{"token": "yes", "logprob": -0.1}]])
    freeze_rows(tmp_path, rows)
    with WorkingCopy.open(tmp_path / "ds") as wc:
        row = wc.get(rows[0]["row_id"])
        review.correct(wc, row.row_id, "carol", row.version, "no", "the customer said no")
        freeze(wc)
    got = {r["row_id"]: r for r in training_input(tmp_path / "ds").rows}[rows[0]["row_id"]]
    assert got["output"] == "yes" and got["label"] == "no"  # the teacher's answer is kept on the row
    _, tok = load_causal_lm(ModelSource(path=str(models / "student")))
    prompt = PromptSettings(**PROMPT)
    (ex,), _ = make_examples([got], tok, prompt, max_length=64, labels=LABELS, want_top_k=True)
    assert ex.answer == answer_ids(tok, "no")  # sft and kd token targets: the corrected answer
    assert ex.label_probs == [0.0, 1.0, 0.0]  # label_probs kd: the reviewer's label with certainty
    assert ex.top_ids is None and ex.corrected  # top-k kd: the stored top-k was the teacher's wrong answer
    top_ids, top_lps = sparse_targets([ex], tok.vocab_size + 4)
    assert top_ids[0, 0] == answer_ids(tok, "no")[0] and top_lps[0, 0] == 0.0
    # and a real kd (logits) step on it trains without error, the corrected positions on the one-hot target
    done = run_recipe(parse_config(_config(tmp_path, models, recipe="kd", teacher={"path": str(models / "teacher")},
                                           max_steps=1)))
    assert done.steps == 1


def test_config_reports_every_problem(tmp_path: Path, models: Path) -> None:
    doc = _config(tmp_path, models, recipe="kd", epochs=0, colour="blue", prompt={"template": "no slot"},
                  kd={"target": "logits", "temperature": -1})
    with pytest.raises(ConfigError) as info:
        parse_config(doc)
    text = str(info.value)
    for needle in ("colour", "epochs", "{input}", "kd.temperature"):
        assert needle in text, text
    assert len(info.value.issues) >= 4


def test_resume_from_checkpoint_matches_an_uninterrupted_run(tmp_path: Path, models: Path) -> None:
    freeze_rows(tmp_path, toy_rows(32))
    from distillgate.data.guard import training_input

    rows = training_input(tmp_path / "ds").rows

    def run(out: Path, fail_at: int | None) -> Any:
        cfg = parse_config(_config(tmp_path, models, output_dir=str(out), epochs=2, checkpoint_every=2))
        torch.manual_seed(0)
        model, tok = load_causal_lm(ModelSource(path=str(models / "student")))
        examples, _ = make_examples(rows, tok, cfg.prompt, max_length=64)
        body, head = decoder_and_head(model)
        calls = {"n": 0}

        def step(batch_examples: Any) -> StepResult:
            calls["n"] += 1
            if fail_at is not None and calls["n"] == fail_at:
                raise KeyboardInterrupt
            batch = collate(batch_examples, tok.pad_token_id)
            h = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            logits = h[batch.rows, batch.cols] @ head.t()
            return StepResult(torch.nn.functional.cross_entropy(logits, batch.labels), batch.n_tokens)

        return train(cfg, model, tok, examples, step, {})

    full = run(tmp_path / "a", None)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", fail_at=6)
    assert (tmp_path / "b" / "checkpoints" / "step-00000004.pt").exists()
    resumed = run(tmp_path / "b", None)
    assert json.loads(resumed.record_path.read_text())["resumed_from"].endswith("step-00000004.pt")
    assert resumed.steps == full.steps == 8
    assert resumed.final_loss == pytest.approx(full.final_loss, rel=1e-4)


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path: Path, models: Path) -> None:
    freeze_rows(tmp_path, toy_rows(16))
    ckpt = tmp_path / "out" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save({"total_steps": 999, "n_examples": 1}, ckpt / "step-00000002.pt")
    with pytest.raises(IntegrityError, match="different run"):
        run_recipe(parse_config(_config(tmp_path, models)))


def test_cli_validate_and_run(tmp_path: Path, models: Path, cli_run: Any) -> None:
    import yaml

    freeze_rows(tmp_path, toy_rows(16))
    doc = _config(tmp_path, models, epochs=1)
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(doc))
    ok = cli_run("train", "validate", str(tmp_path / "train.yaml"), "epochs=2")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["epochs"] == 2
    bad = cli_run("train", "validate", str(tmp_path / "train.yaml"), "lr=-1", "nonsense=1")
    assert bad.returncode == 1 and "lr" in bad.stderr and "nonsense" in bad.stderr
    done = cli_run("train", "sft", str(tmp_path / "train.yaml"))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(summary["model_dir"], "config.json").exists() and summary["steps"] == 2
    assert "resolved config" in done.stderr


def test_batched_label_scoring_matches_one_prompt_at_a_time() -> None:
    from _train_support import make_model
    from distillgate.train.labels import score_labels_batch

    model = make_model(3).eval()
    prompts = [[2, 5, 6, 7, 8], [2, 9, 10], [2, 11, 12, 13, 14, 15, 16]]
    labels = [[8, 3], [9, 10, 3], [11, 3], [12, 13, 14, 3]]
    with torch.no_grad():
        one = torch.stack([score_labels(model, p, labels) for p in prompts])
        # the direct formula: sum of next-token log-probs of prompt + label, one sequence at a time
        direct = torch.empty(3, 4)
        for i, p in enumerate(prompts):
            for j, lab in enumerate(labels):
                logp = torch.log_softmax(model(input_ids=torch.tensor([p + lab])).logits[0], -1)
                direct[i, j] = sum(logp[len(p) - 1 + k, t] for k, t in enumerate(lab))
    torch.testing.assert_close(one, direct, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(score_labels_batch(model, prompts, labels), one, rtol=1e-4, atol=1e-4)


def test_batched_label_scores_give_the_same_gradients_as_one_prompt_at_a_time() -> None:
    """The kd recipe trains through ``label_scores`` (one padded batch): same loss and gradients as row by row."""
    from _train_support import make_model
    from distillgate.train.labels import label_scores

    model = make_model(3).train()
    prompts = [[2, 5, 6, 7, 8], [2, 9, 10], [2, 11, 12, 13, 14, 15, 16]]
    labels = [[8, 3], [9, 10, 3], [11, 3], [12, 13, 14, 3]]
    target = torch.softmax(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), -1)

    def grads(scores: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        loss = -(target * torch.log_softmax(scores, -1)).sum()
        loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    batched = grads(label_scores(model, prompts, labels))
    single = grads(torch.stack([score_labels(model, p, labels) for p in prompts]))
    assert len(batched) == len(single) > 0
    for x, y in zip(batched, single, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-5)


def test_load_rows_reads_jsonl_and_parquet_and_keeps_provenance(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distillgate.errors import NotFoundError, UserError
    from distillgate.train.rows import provenance

    rows = toy_rows(3)
    rows[0]["filter_status"] = "fail"
    rows[1]["stamp"] = {"entry_index": 12, "entry_hash": "ab" * 32, "signature": "sig"}  # what a stamp carries
    rows[2]["stamp"] = {"decision_id": "d-2"}  # no log entry named: counted as unstamped
    write_jsonl(tmp_path / "r.jsonl", rows)
    got = load_rows(tmp_path / "r.jsonl")
    assert [r["row_id"] for r in got] == [rows[1]["row_id"], rows[2]["row_id"]]
    assert provenance(got)["policy_decisions"] == [f"12:{'ab' * 32}"] and provenance(got)["unstamped"] == 1
    pq.write_table(pa.Table.from_pylist(toy_rows(4)), tmp_path / "r.parquet")
    assert len(load_rows(tmp_path / "r.parquet")) == 4
    (tmp_path / "bad.jsonl").write_text('{"row_id": "x", "split": "train"}\n')
    with pytest.raises(UserError, match="lacks input"):
        load_rows(tmp_path / "bad.jsonl")
    with pytest.raises(NotFoundError):
        load_rows(tmp_path / "missing.jsonl")


def test_chunked_label_kd_step_gives_the_whole_batch_gradients() -> None:
    """Large label sets: the kd step backpropagates row chunk by row chunk, with the same gradients and loss."""
    from _train_support import make_model
    from distillgate.train.config import KDSettings
    from distillgate.train.encode import Example
    from distillgate.train.recipes.kd import label_kd_step

    model = make_model(3).train()
    labels = [[8, 3], [9, 10, 3], [11, 3], [12, 13, 14, 3]]
    gen = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(5, 4, generator=gen), -1).tolist()
    prompts = [[2, 5, 6, 7, 8], [2, 9, 10], [2, 11, 12, 13, 14, 15, 16], [2, 7], [2, 8, 9, 10]]
    batch = [Example(row_id=f"r{i}", prompt=p, answer=labels[i % 4], label_index=None if i == 3 else i % 4,
                     label_probs=probs[i]) for i, p in enumerate(prompts)]
    kd = KDSettings(target="label_probs", divergence="fkl", temperature=2.0, hard_weight=0.5)

    def run(max_continuations: int) -> tuple[float, dict[str, float], list[torch.Tensor], bool]:
        model.zero_grad()
        result = label_kd_step(model, batch, labels, 0, kd, max_continuations=max_continuations)
        if not result.backward_done:
            result.loss.backward()
        return (float(result.loss), result.parts, [p.grad.clone() for p in model.parameters() if p.grad is not None],
                result.backward_done)

    whole_loss, whole_parts, whole, done_whole = run(10_000)
    chunk_loss, chunk_parts, chunked, done_chunked = run(8)  # 2 rows per pass: chunks of 2, 2 and 1 rows
    assert not done_whole and done_chunked
    assert abs(whole_loss - chunk_loss) < 1e-5
    assert abs(whole_parts["kd"] - chunk_parts["kd"]) < 1e-5 and abs(whole_parts["ce"] - chunk_parts["ce"]) < 1e-5
    assert len(whole) == len(chunked) > 0
    for x, y in zip(whole, chunked, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)

