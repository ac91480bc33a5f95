"""Tiny real models for training tests: a word-level tokenizer and small random Llama models saved to disk."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "red", "green", "blue", "yes", "no", "maybe", "say", "the",
         "word", "card", "lost", "rate", "fee"]
LABELS = ["yes", "no", "maybe"]


def make_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def make_model(seed: int, layers: int = 2, hidden: int = 32) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=4 + len(WORDS), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0, bos_token_id=2,
                      eos_token_id=3)
    return LlamaForCausalLM(cfg)


def save_model(directory: Path, seed: int, layers: int = 2) -> Path:
    make_model(seed, layers).save_pretrained(directory)
    make_tokenizer().save_pretrained(directory)
    return directory


def toy_rows(n: int, split: str = "train", seed: int = 0) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    content = WORDS[:8]
    for i in range(n):
        words = [content[int(j)] for j in torch.randint(0, len(content), (3,), generator=g)]
        label = LABELS[content.index(words[0]) % 3]
        rows.append({"row_id": f"r{seed}-{i}", "input": " ".join(words), "output": label, "label": label,
                     "split": split, "filter_status": "pass", "edited": False})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def freeze_rows(tmp: Path, rows: list[dict[str, Any]], name: str = "ds") -> Path:
    """A real frozen dataset version holding ``rows`` (toy dicts: row_id, input, output, label, split, ...): a
    working copy at ``tmp/name`` whose HEAD is the version. Returns the working copy directory (a training
    ``dataset``)."""
    from distillgate.data.schema import FIELD_NAMES, Row, text_sha256
    from distillgate.data.store import WorkingCopy
    from distillgate.data.versions import freeze

    records = []
    for r in rows:
        fields = {k: v for k, v in r.items() if k in FIELD_NAMES}
        fields.setdefault("input_id", str(r["row_id"]))
        fields.setdefault("output_raw", r.get("output") or r.get("label"))
        fields.setdefault("teacher_label", r.get("label"))
        fields.setdefault("input_sha256", text_sha256(str(r["input"])))
        records.append(Row.from_record(fields))
    with WorkingCopy.create(tmp / name, {"name": name}) as wc:
        wc.add_inputs(records)
        freeze(wc)
    return tmp / name
