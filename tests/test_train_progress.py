"""Long training shows progress without a terminal, and checkpoints by time so a killed run resumes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from _train_support import freeze_rows, save_model, toy_rows
from distillgate.train import parse_config, run_recipe
from distillgate.train.config import ModelSource
from distillgate.train.encode import collate, make_examples
from distillgate.train.loop import ProgressLines, StepResult, train
from distillgate.train.student import decoder_and_head, load_causal_lm

LINE = re.compile(r"^sft step (\d+)/(\d+) \(epoch [\d.]+\) loss \d+\.\d{4} \| [\d.]+ s/step \d+ tok/s \| "
                  r"elapsed \d+:\d\d eta \d+:\d\d$", re.M)


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_model(tmp_path_factory.mktemp("models") / "student", seed=2, layers=2)


def _config(tmp: Path, student: Path, **over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"recipe": "sft", "dataset": str(tmp / "ds"), "output_dir": str(tmp / "out"),
                           "student": {"model": {"path": str(student)}},
                           "prompt": {"template": "say the word {input}", "system": "classify"},
                           "epochs": 1, "batch_size": 4, "lr": 3e-3, "threads": 1}
    doc.update(over)
    return doc


def _lines(text: str) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in LINE.findall(text)]


def _run_in_process(tmp: Path, student: Path, capsys: pytest.CaptureFixture[str], **over: Any) -> str:
    tmp.mkdir(parents=True, exist_ok=True)
    freeze_rows(tmp, toy_rows(32))  # training reads a frozen dataset version, never a free rows file
    run_recipe(parse_config(_config(tmp, student, **over)))
    err = capsys.readouterr().err  # captured: stderr is not a terminal, as under CI, nohup or a log file
    assert "sft: 8 steps over 32 rows (batch 4)" in err
    return err


@pytest.mark.slow
def test_progress_lines_from_a_real_process_without_a_terminal(tmp_path: Path, student: Path,
                                                                cli_run: Any) -> None:
    freeze_rows(tmp_path, toy_rows(32))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(_config(tmp_path, student, progress_every_s=1e-6,
                                                                log_every=1000)))
    done = cli_run("train", "sft", str(tmp_path / "train.yaml"))  # stdout and stderr are pipes
    assert done.returncode == 0, done.stderr
    assert "sft: 8 steps over 32 rows (batch 4)" in done.stderr
    assert _lines(done.stderr) == [(i, 8) for i in range(1, 9)]


def test_progress_lines_without_a_terminal(tmp_path: Path, student: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    # every line is due by time: one per step, each with step, loss, rate and ETA
    err = _run_in_process(tmp_path, student, capsys, progress_every_s=1e-6, log_every=1000)
    assert _lines(err) == [(i, 8) for i in range(1, 9)]


def test_first_and_last_step_are_reported_even_when_lines_are_rare(tmp_path: Path, student: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # a run of few slow steps (the issue: 10 KD steps of ~35 s, log_every 10) must not stay silent until the end
    err = _run_in_process(tmp_path, student, capsys, progress_every_s=3600, log_every=1000)
    assert _lines(err) == [(1, 8), (8, 8)]
    # and log_every still adds its lines
    err = _run_in_process(tmp_path / "again", student, capsys, progress_every_s=3600, log_every=3)
    assert _lines(err) == [(1, 8), (3, 8), (6, 8), (8, 8)]


def test_eta_from_the_observed_step_rate() -> None:
    now = [100.0]
    lines = ProgressLines("sft", total=10, per_epoch=5, every_s=30, every_steps=1000, start_step=0,
                          clock=lambda: now[0])
    assert lines.due(1)
    now[0] = 104.0
    text = lines.line(2, 0.5, 123.4)
    assert text == "sft step 2/10 (epoch 0.40) loss 0.5000 | 2.00 s/step 123 tok/s | elapsed 0:04 eta 0:16"
    now[0] = 120.0
    assert not lines.due(3)  # 16 s since the last line
    now[0] = 134.5
    assert lines.due(4) and lines.due(10)
    resumed = ProgressLines("kd", total=100, per_epoch=10, every_s=30, every_steps=10, start_step=40,
                            clock=lambda: now[0])
    now[0] += 7200
    assert resumed.line(50, 1.0, 5.0).endswith("elapsed 2:00:00 eta 10:00:00")  # the rate since the resume


def test_time_based_checkpoint_lets_a_killed_run_resume(tmp_path: Path, student: Path) -> None:
    """Steps far apart (checkpoint_every never reached): checkpoint_every_s still leaves something to resume."""
    freeze_rows(tmp_path, toy_rows(32))
    from distillgate.data.guard import training_input

    rows = training_input(tmp_path / "ds").rows

    def run(out: Path, fail_at: int | None) -> Any:
        cfg = parse_config(_config(tmp_path, student, output_dir=str(out), checkpoint_every=1000,
                                   checkpoint_every_s=1e-6))
        torch.manual_seed(0)
        model, tok = load_causal_lm(ModelSource(path=str(student)))
        examples, _ = make_examples(rows, tok, cfg.prompt, max_length=64)
        body, head = decoder_and_head(model)
        calls = {"n": 0}

        def step(batch_examples: Any) -> StepResult:
            calls["n"] += 1
            if fail_at is not None and calls["n"] == fail_at:
                raise KeyboardInterrupt  # killed mid-run
            batch = collate(batch_examples, tok.pad_token_id)
            h = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            logits = h[batch.rows, batch.cols] @ head.t()
            return StepResult(torch.nn.functional.cross_entropy(logits, batch.labels), batch.n_tokens)

        return train(cfg, model, tok, examples, step, {})

    full = run(tmp_path / "a", None)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", fail_at=6)
    assert [p.name for p in (tmp_path / "b" / "checkpoints").glob("step-*.pt")] == ["step-00000005.pt"]
    resumed = run(tmp_path / "b", None)
    assert json.loads(resumed.record_path.read_text())["resumed_from"].endswith("step-00000005.pt")
    assert resumed.steps == full.steps == 8
    assert resumed.final_loss == pytest.approx(full.final_loss, rel=1e-4)
