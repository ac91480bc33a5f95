"""The encoder-classifier student family: chosen in the config, trained end to end with kd or sft, refused on
protected rows, saved with its card and served by ``student_source`` the way ``distillgate eval`` serves it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from _encoder_support import tiny_encoder
from _train_support import LABELS, WORDS, freeze_rows, toy_rows, write_jsonl
from distillgate.errors import ConfigError, DatasetGuardError
from distillgate.evals.sources import EncoderClassifierSource, LocalCausalLMSource, student_source
from distillgate.train import run_recipe
from distillgate.train.config import parse_config
from distillgate.train.encoder import is_encoder_student, load_encoder_student

CUE = {"yes": "red", "no": "green", "maybe": "blue"}


def cue_rows(n: int, split: str = "train", seed: int = 0) -> list[dict[str, Any]]:
    """Toy rows whose label is told by one cue word among fillers (separable by a mean-pooled encoder)."""
    rows = toy_rows(n, split, seed)
    for i, r in enumerate(rows):
        label = LABELS[i % 3]
        r.update(input=f"{WORDS[i % 5]} {CUE[label]} {WORDS[(i * 7) % 5]}", label=label, output=label)
    return rows


def soft_rows(n: int, split: str = "train", seed: int = 0) -> list[dict[str, Any]]:
    """Cue rows whose teacher distribution puts 0.8 on the row's label."""
    rows = cue_rows(n, split, seed)
    for r in rows:
        r["label_probs"] = {lab: (0.8 if lab == r["label"] else 0.1) for lab in LABELS}
    return rows


def config(tmp_path: Path, rows: list[dict[str, Any]], recipe: str = "kd", *, rows_file: bool = False,
           **student: Any) -> Any:
    """A config training on a frozen version holding ``rows`` (and, with ``rows_file``, a rows file naming them
    all, as a careless caller might)."""
    enc = tiny_encoder(tmp_path / "enc") if not (tmp_path / "enc").exists() else tmp_path / "enc"
    dataset = freeze_rows(tmp_path, rows, name=f"ds-{recipe}")
    listed = {"rows": str(write_jsonl(tmp_path / "rows.jsonl", rows))} if rows_file else {}
    doc = {"recipe": recipe, "dataset": str(dataset), **listed,
           "output_dir": str(tmp_path / f"out-{recipe}"), "labels": LABELS,
           "student": {"family": "encoder", "encoder": {"path": str(enc), **student}},
           "kd": {"target": "label_probs", "temperature": 2.0, "hard_weight": 0.5},
           "epochs": 6, "batch_size": 8, "lr": 2e-3, "threads": 1, "log_every": 1000}
    return parse_config(doc, "test")


def accuracy(model_dir: Path, rows: list[dict[str, Any]]) -> float:
    source = EncoderClassifierSource(model_dir, threads=1)
    hits = 0
    for r in rows:
        probs, seconds = source.score_labels([{"role": "user", "content": r["input"]}], LABELS)
        assert abs(sum(probs) - 1) < 1e-5 and seconds >= 0
        hits += LABELS[max(range(3), key=probs.__getitem__)] == r["label"]
    return hits / len(rows)


def test_kd_trains_the_encoder_end_to_end_and_saves_a_servable_student(tmp_path: Path) -> None:
    rows = soft_rows(24)
    cfg = config(tmp_path, rows)
    before = {k: v.clone() for k, v in load_encoder_student_weights(tmp_path / "enc").items()}
    result = run_recipe(cfg)
    model_dir = result.model_dir
    assert is_encoder_student(model_dir)
    card = json.loads((model_dir / "student.json").read_text())
    assert card["family"] == "encoder_classifier" and card["labels"] == LABELS
    record = json.loads(result.record_path.read_text())
    assert record["family"] == "encoder_classifier" and record["status"] == "finished"
    model, _ = load_encoder_student(model_dir)
    after = model.encoder.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("encoder.layer.0" in k for k in changed)  # the encoder itself learned, not only the head
    assert accuracy(model_dir, rows) >= 0.9  # it fits what it was taught
    assert isinstance(student_source(model_dir, threads=1), EncoderClassifierSource)


def load_encoder_student_weights(directory: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModel

    return dict(AutoModel.from_pretrained(str(directory)).state_dict())


def test_sft_trains_on_hard_labels_without_distributions(tmp_path: Path) -> None:
    rows = cue_rows(24)  # no label_probs at all
    result = run_recipe(config(tmp_path, rows, recipe="sft"))
    assert accuracy(result.model_dir, rows) >= 0.9


def test_kd_without_distributions_is_refused_with_a_fix(tmp_path: Path) -> None:
    from distillgate.errors import UserError

    with pytest.raises(UserError, match="label_probs") as info:
        run_recipe(config(tmp_path, toy_rows(8)))
    assert "sft" in (info.value.hint or "")


def test_frozen_encoder_trains_only_the_head(tmp_path: Path) -> None:
    rows = soft_rows(8)
    result = run_recipe(config(tmp_path, rows, freeze_encoder=True))
    before = load_encoder_student_weights(tmp_path / "enc")
    model, _ = load_encoder_student(result.model_dir)
    assert all(torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())


@pytest.mark.parametrize("split", ["test", "golden", "holdout"])
def test_protected_rows_are_refused_before_training(tmp_path: Path, split: str) -> None:
    rows = soft_rows(6) + soft_rows(1, split=split, seed=9)
    with pytest.raises(DatasetGuardError, match="protected"):
        run_recipe(config(tmp_path, rows, rows_file=True))
    assert not (tmp_path / "out-kd" / "model").exists()


def test_family_selection_is_validated() -> None:
    base = {"recipe": "kd", "rows": "r.jsonl", "output_dir": "o", "labels": LABELS,
            "kd": {"target": "label_probs"}}
    assert parse_config({**base, "student": {"family": "encoder"}}).student.encoder is not None
    with pytest.raises(ConfigError, match="not 'model'"):
        parse_config({**base, "student": {"family": "encoder", "from_teacher": {"every": 2}}})
    with pytest.raises(ConfigError, match="family: encoder"):
        parse_config({**base, "student": {"model": {"path": "m"}, "encoder": {}}})
    with pytest.raises(ConfigError, match="label_probs"):
        parse_config({**base, "kd": {"target": "top_logprobs"}, "student": {"family": "encoder"}})
    no_labels = {k: v for k, v in base.items() if k != "labels"}
    with pytest.raises(ConfigError, match="needs 'labels'"):
        parse_config({**no_labels, "recipe": "sft", "student": {"family": "encoder"}})


def test_a_causal_lm_directory_is_still_served_as_one(tmp_path: Path) -> None:
    from _train_support import save_model

    d = save_model(tmp_path / "lm", seed=0)
    assert not is_encoder_student(d)
    source = student_source(d, threads=1)
    assert isinstance(source, LocalCausalLMSource)


def test_the_head_starts_at_the_label_prototypes_and_a_label_without_rows_at_its_name(tmp_path: Path) -> None:
    """With head_init: prototypes (the default) the untrained student is already a nearest-centroid classifier:
    zero epochs of training fit the cue rows; a label no row carries starts at its name's embedding."""
    rows = [r for r in soft_rows(24) if r["label"] != "maybe"]
    for r in rows:
        r["label_probs"] = {lab: (1.0 if lab == r["label"] else 0.0) for lab in LABELS}
    doc = config(tmp_path, rows).model_dump(mode="json")
    result = run_recipe(parse_config({**doc, "epochs": 0.0001, "lr": 1e-9}, "test"))  # one step, a no-op rate
    record = json.loads(result.record_path.read_text())
    assert record["student"]["head_init"] == "prototypes" and record["student"]["labels_started_from_name"] == 1
    assert json.loads((result.model_dir / "student.json").read_text())["normalise"] is True
    assert accuracy(result.model_dir, rows) >= 0.9
    model, _ = load_encoder_student(result.model_dir)
    norms = model.head.weight.norm(dim=-1)
    assert torch.allclose(norms, torch.full_like(norms, 20.0), atol=0.01)  # scale x unit-length prototypes
    rand = run_recipe(parse_config({**doc, "epochs": 0.0001, "lr": 1e-9, "output_dir": str(tmp_path / "rand"),
                                    "student": {"family": "encoder", "encoder": {"path": str(tmp_path / "enc"),
                                                                                 "head_init": "random"}}}, "test"))
    assert json.loads((rand.model_dir / "student.json").read_text())["normalise"] is False
    assert accuracy(rand.model_dir, rows) < 0.9  # a random head knows nothing yet


def test_an_int8_student_says_so_in_its_card_and_is_served_quantised(tmp_path: Path) -> None:
    """serve: int8 saves the fp32 weights with ``serve: int8`` on the card; every loader (eval's source, the
    gateway's student) quantises the encoder's Linear layers, and its answers stay those of the fp32 model."""
    import asyncio

    from distillgate.errors import UserError
    from distillgate.teachers.student import EncoderStudent, public_card, read_card

    rows = soft_rows(24)
    result = run_recipe(config(tmp_path, rows, serve="int8"))
    card = json.loads((result.model_dir / "student.json").read_text())
    assert card["serve"] == "int8"
    assert json.loads(result.record_path.read_text())["student"]["serve"] == "int8"
    quantised, tok = load_encoder_student(result.model_dir)
    exact, _ = load_encoder_student(result.model_dir, serve="fp32")
    kinds = {type(m).__module__ for m in quantised.encoder.modules() if "Linear" in type(m).__name__}
    assert quantised.quantised and kinds and all("quantized" in k for k in kinds)  # every Linear is int8
    assert not exact.quantised and all(type(m) is torch.nn.Linear
                                       for m in exact.encoder.modules() if "Linear" in type(m).__name__)
    assert type(quantised.head) is torch.nn.Linear  # the head stays fp32
    assert quantised.card()["parameters"] == exact.card()["parameters"] == card["parameters"]
    from distillgate.train.encoder import encode_texts

    ids, mask = encode_texts(tok, [r["input"] for r in rows], 16)
    with torch.inference_mode():
        pq, pe = torch.softmax(quantised(ids, mask), -1), torch.softmax(exact(ids, mask), -1)
    assert float((pq - pe).abs().max()) < 0.05 and bool((pq.argmax(-1) == pe.argmax(-1)).all())
    assert accuracy(result.model_dir, rows) >= 0.9  # what eval serves is the quantised model
    source = EncoderClassifierSource(result.model_dir, threads=1)
    assert source._model.quantised and source.describe()["serve"] == "int8"
    served = EncoderStudent("toy", result.model_dir.parent)
    assert served.card().method["serve"] == "int8" and served._model.quantised
    verdict = asyncio.run(served.aclassify({"messages": [{"role": "user", "content": rows[0]["input"]}]}))
    assert verdict.label == rows[0]["label"] and verdict.tokens == int(mask[0].sum())
    assert read_card(result.model_dir)["serve"] == "int8" and public_card(result.model_dir)["family"]
    with pytest.raises(UserError, match="cannot be saved"):  # a quantised model never overwrites the fp32 one
        quantised.save_pretrained(tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_the_serving_mode_is_validated(tmp_path: Path) -> None:
    base = {"recipe": "kd", "rows": "r.jsonl", "output_dir": "o", "labels": LABELS, "kd": {"target": "label_probs"}}
    assert parse_config({**base, "student": {"family": "encoder"}}).student.encoder.serve == "fp32"  # type: ignore
    with pytest.raises(ConfigError, match="serve"):
        parse_config({**base, "student": {"family": "encoder", "encoder": {"serve": "int4"}}})
    # a card that names an unknown mode is refused on load, not served as something else
    result = run_recipe(config(tmp_path, soft_rows(8)))
    card_path = result.model_dir / "student.json"
    card = json.loads(card_path.read_text())
    assert card["serve"] == "fp32" and not load_encoder_student(result.model_dir)[0].quantised
    card_path.write_text(json.dumps({**card, "serve": "int4"}))
    from distillgate.errors import UserError

    with pytest.raises(UserError, match="int4"):
        load_encoder_student(result.model_dir)
    del card["serve"]  # a student saved before the option: fp32
    card_path.write_text(json.dumps(card))
    assert not load_encoder_student(result.model_dir)[0].quantised


def test_one_item_is_padded_to_its_own_length_and_a_batch_to_its_longest(tmp_path: Path) -> None:
    from distillgate.train.encoder import encode_texts, load_encoder

    _, tok = load_encoder(str(tiny_encoder(tmp_path / "enc")))
    ids, mask = encode_texts(tok, ["rain"], 64)
    assert ids.shape == (1, 3) and int(mask.sum()) == 3  # [CLS] rain [SEP], not 64 columns
    ids, mask = encode_texts(tok, ["rain", " ".join(WORDS[:4])], 64)
    assert ids.shape == (2, 6) and mask[0].tolist() == [1, 1, 1, 0, 0, 0]
    ids, _ = encode_texts(tok, [" ".join(WORDS * 20)], 8)
    assert ids.shape == (1, 8)  # never past max_length


def test_frozen_word_embeddings_stay_pretrained_while_the_layers_learn(tmp_path: Path) -> None:
    rows = soft_rows(24)
    result = run_recipe(config(tmp_path, rows, freeze_word_embeddings=True))
    before = load_encoder_student_weights(tmp_path / "enc")
    model, _ = load_encoder_student(result.model_dir)
    after = model.encoder.state_dict()
    assert torch.equal(before["embeddings.word_embeddings.weight"], after["embeddings.word_embeddings.weight"])
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("encoder.layer.0" in k for k in changed) and any("position_embeddings" in k for k in changed)
    record = json.loads(result.record_path.read_text())
    assert record["student"]["freeze_word_embeddings"] is True
    assert record["student"]["trainable"] == record["student"]["parameters"] - before[
        "embeddings.word_embeddings.weight"].numel()
    assert accuracy(result.model_dir, rows) >= 0.9
