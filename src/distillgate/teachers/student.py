"""A trained student served as an upstream: ``student/NAME`` in the gateway, loaded from its saved artefact.

Only the encoder-classifier family (``train.student.family: encoder``) is served here: one forward pass gives the
label distribution, so the answer is the most probable label, with ``label_probs`` on the choice and the
confidence (the maximum label probability) that routing compares with its threshold. The artefact is what
``distillgate train`` wrote: the model directory (``student.json`` inside) or the run's output directory (with
``model/`` inside). The operator registers it under a name; a request never names a path.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distillgate.errors import NotFoundError, UpstreamError
from distillgate.teachers.base import Teacher, TeacherCard

CARD_FILE = "student.json"
ENCODER_FAMILY = "encoder_classifier"


def student_dir(artefact: str | Path) -> Path:
    """The model directory of a saved student: ``artefact`` itself or its ``model/`` (a run's output dir)."""
    base = Path(artefact)
    for candidate in (base, base / "model"):
        if (candidate / CARD_FILE).is_file():
            return candidate
    raise NotFoundError(f"no trained student at {base} ({CARD_FILE} missing there and in model/)",
                        hint="register the output_dir (or its model/ folder) that `distillgate train` wrote")


def read_card(artefact: str | Path) -> dict[str, Any]:
    """The student's card (``student.json``) without loading any weights."""
    card: dict[str, Any] = json.loads((student_dir(artefact) / CARD_FILE).read_text())
    return card


def _user_text(body: Mapping[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in reversed(messages):
            if isinstance(m, Mapping) and m.get("role") == "user":
                content = m.get("content")
                if isinstance(content, str):
                    return content
                if isinstance(content, list):  # content parts: the text ones, joined
                    return " ".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    raise UpstreamError("a student classifier needs a user message (or a prompt) to classify", status=400)


@dataclass(frozen=True)
class Verdict:
    """One classification: the label, its probability (the confidence) and the whole distribution."""

    label: str
    confidence: float
    probs: dict[str, float]
    tokens: int
    seconds: float


class StudentTeacher(Teacher):
    """An encoder-classifier student behind the teacher interface (see the module docstring)."""

    def __init__(self, name: str, artefact: str | Path, *, threads: int = 1) -> None:
        import torch

        from distillgate.train.encoder import encode_texts, is_encoder_student, load_encoder_student

        directory = student_dir(artefact)
        if not is_encoder_student(directory):
            raise NotFoundError(f"student {name!r} is not an encoder classifier; only that family is served",
                                hint="train it with train.student.family: encoder")
        torch.set_num_threads(max(1, threads))
        self._torch = torch
        self._encode = encode_texts
        self._model, self._tokenizer = load_encoder_student(directory)
        self._lock = threading.Lock()
        self.model_name = f"student/{name}"
        self.labels: list[str] = list(self._model.labels)
        weights = directory / "model.safetensors"
        digest = hashlib.sha256()
        for part in (weights, directory / "classifier.safetensors"):
            if part.is_file():
                digest.update(part.read_bytes())
        self._card = TeacherCard(model_id=self.model_name, backend=ENCODER_FAMILY, file_sha256=digest.hexdigest(),
                                 parameter_count=int(self._model.card()["parameters"]), source=directory.parent.name
                                 if directory.name == "model" else directory.name,
                                 method={"family": ENCODER_FAMILY, "labels": self.labels})

    def classify(self, text: str) -> Verdict:
        """The label distribution of one text (synchronous; the async calls run it off the event loop)."""
        start = time.perf_counter()
        with self._lock:
            ids, mask = self._encode(self._tokenizer, [text], self._model.max_length)
            with self._torch.no_grad():
                probs = self._torch.softmax(self._model(ids, mask)[0].float(), dim=-1).tolist()
        best = max(range(len(probs)), key=probs.__getitem__)
        return Verdict(self.labels[best], float(probs[best]), dict(zip(self.labels, map(float, probs), strict=True)),
                       int(mask.sum()), time.perf_counter() - start)

    async def aclassify(self, body: Mapping[str, Any]) -> Verdict:
        return await asyncio.to_thread(self.classify, _user_text(body))

    def answer(self, verdict: Verdict, *, chat: bool = True) -> dict[str, Any]:
        """The OpenAI-shaped answer for a verdict (``label_probs`` on the choice)."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None,
                                  "label_probs": {k: round(v, 6) for k, v in verdict.probs.items()}}
        if chat:
            choice["message"] = {"role": "assistant", "content": verdict.label}
        else:
            choice["text"] = verdict.label
        return {"id": f"student-{uuid.uuid4().hex[:16]}", "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": [choice],
                "usage": {"prompt_tokens": verdict.tokens, "completion_tokens": 1, "total_tokens": verdict.tokens + 1}}

    async def chat_completion(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.answer(await self.aclassify(body))

    async def completion(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.answer(await self.aclassify(body), chat=False)

    async def stream_chat_completion(self, body: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        whole = await self.chat_completion(body)
        for chunk in stream_chunks(whole):
            yield chunk

    def card(self) -> TeacherCard:
        return self._card


def stream_chunks(whole: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A whole ``chat.completion`` as the chunks of a stream: the content, then the usage."""
    base = {"id": whole["id"], "object": "chat.completion.chunk", "created": whole["created"], "model": whole["model"]}
    chunks = []
    for c in whole["choices"]:
        delta = {"role": "assistant", "content": c["message"]["content"]}
        chunks.append({**base, "choices": [{"index": c["index"], "delta": delta, "finish_reason": c["finish_reason"],
                                            "label_probs": c.get("label_probs")}]})
    chunks.append({**base, "choices": [], "usage": whole["usage"]})
    return chunks
