"""A trained student served as an upstream: ``student/NAME`` in the gateway, loaded from its saved artefact.

The artefact is what ``distillgate train`` wrote: the run's output directory (``run.json`` + ``model/``) or its
``model/`` folder. The operator registers it under a name; a request never names a path. Two families are served:

* **encoder classifier** (``train.student.family: encoder``; ``student.json`` in ``model/``): one forward pass gives
  the label distribution (:class:`EncoderStudent`, here);
* **causal LM** (``family: causal_lm``; a Hugging Face model in ``model/``, its training record ``run.json`` beside
  it): with ``train.labels`` it is a *label* student that scores that label set as the answer to the request, the
  way the local teacher's ``label_choices`` does; without, a *text* student that generates
  (:class:`distillgate.teachers.causal_student.CausalStudent`).

Every student answers a request with a :class:`Verdict`: the answer (a label, or the generated text), its
confidence -- ``label_prob`` (the maximum label probability) for label students, ``mean_token_prob`` (exp of the
mean log-probability of the generated tokens) for text students, the two kinds a threshold file
(``distillgate route choose``) may hold -- and what it cost. Routing compares the confidence with its threshold.
"""

from __future__ import annotations

import abc
import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from distillgate.errors import NotFoundError, UpstreamError
from distillgate.teachers.base import Teacher, TeacherCard

CARD_FILE = "student.json"
RUN_FILE = "run.json"
ENCODER_FAMILY = "encoder_classifier"
CAUSAL_FAMILY = "causal_lm"
Confidence = Literal["label_prob", "mean_token_prob"]


def student_dir(artefact: str | Path) -> Path:
    """The model directory of a saved student: ``artefact`` itself or its ``model/`` (a run's output dir).

    An encoder student's model directory holds ``student.json``; a causal-LM student's holds ``config.json`` and
    sits beside the run's ``run.json`` (its card: labels, prompt, recipe)."""
    base = Path(artefact)
    for candidate in (base, base / "model"):
        if (candidate / CARD_FILE).is_file():
            return candidate
        if (candidate / "config.json").is_file() and (candidate.parent / RUN_FILE).is_file():
            return candidate
    raise NotFoundError(f"no trained student at {base} (neither {CARD_FILE} nor a model/config.json beside "
                        f"{RUN_FILE}, here or in model/)",
                        hint="register the output_dir (or its model/ folder) that `distillgate train` wrote")


def artefact_issue(artefact: str | Path) -> str | None:
    """Why ``artefact`` is not a servable student (``None`` when it is); reads card files only, no weights."""
    try:
        read_card(artefact)
    except NotFoundError as exc:
        return exc.message
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its card cannot be read ({type(exc).__name__}: {exc})"
    return None


def read_card(artefact: str | Path) -> dict[str, Any]:
    """The student's card without loading any weights: ``family``, ``task`` (labels | text), ``labels``,
    ``confidence`` (the kind its verdicts carry), ``parameters``, and the family's own fields."""
    directory = student_dir(artefact)
    if (directory / CARD_FILE).is_file():
        card: dict[str, Any] = json.loads((directory / CARD_FILE).read_text())
        if card.get("family") != ENCODER_FAMILY:
            raise NotFoundError(f"{CARD_FILE} of {directory.name} names family {card.get('family')!r}, not "
                                f"{ENCODER_FAMILY!r}", hint="register an artefact `distillgate train` wrote")
        return {**card, "task": "labels", "confidence": "label_prob"}
    record = json.loads((directory.parent / RUN_FILE).read_text())
    if record.get("status") != "finished":  # a run training again in place: model/ is the old run's, run.json not
        raise NotFoundError(f"the training run of {directory.parent.name} has not finished (status "
                            f"{record.get('status')!r})", hint="serve it once `distillgate train` has finished")
    config = record.get("config") or {}
    labels = config.get("labels") or None
    model = json.loads((directory / "config.json").read_text())
    return {"family": CAUSAL_FAMILY, "task": "labels" if labels else "text", "labels": labels,
            "confidence": "label_prob" if labels else "mean_token_prob",
            "parameters": (record.get("student") or {}).get("parameters"), "recipe": record.get("recipe"),
            "architecture": model.get("model_type"), "prompt": config.get("prompt") or {}}


def public_card(artefact: str | Path) -> dict[str, Any]:
    """What ``/v1/models`` says about a student: what it is, never where it is on disk."""
    card = read_card(artefact)
    out = {k: card.get(k) for k in ("family", "task", "labels", "confidence")}
    out["parameter_count"] = card.get("parameters")  # the key an evaluation reads from a served model's card
    out["architecture"] = card.get("encoder") if card.get("family") == ENCODER_FAMILY else card.get("architecture")
    out["artefact"] = Path(artefact).name
    return out


def user_text(body: Mapping[str, Any]) -> str:
    """The last user message's text (content parts joined), or a completion's prompt."""
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
    """One answer of a student: ``label`` (the label, or a text student's generated text), its confidence, the
    label distribution (empty for text), and what it cost."""

    label: str
    confidence: float
    probs: dict[str, float]
    tokens: int  # prompt tokens
    seconds: float
    completion_tokens: int = 1
    finish_reason: str = "stop"


class StudentTeacher(Teacher):
    """A served student: ``aclassify`` (the verdict routing reads) and ``answer`` (the verdict as an answer)."""

    model_name: str
    #: the label set, in the student's order; ``None`` for a text student
    labels: list[str] | None
    confidence_kind: Confidence

    @abc.abstractmethod
    async def aclassify(self, body: Mapping[str, Any]) -> Verdict:
        """The student's verdict on a request body (chat or completion); ``UpstreamError`` when it cannot."""

    def answer(self, verdict: Verdict, *, chat: bool = True) -> dict[str, Any]:
        """The OpenAI-shaped answer for a verdict (``label_probs`` on the choice of a label student)."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": verdict.finish_reason, "logprobs": None}
        if verdict.probs:
            choice["label_probs"] = {k: round(v, 6) for k, v in verdict.probs.items()}
        if chat:
            choice["message"] = {"role": "assistant", "content": verdict.label}
        else:
            choice["text"] = verdict.label
        return {"id": f"student-{uuid.uuid4().hex[:16]}", "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": [choice],
                "usage": {"prompt_tokens": verdict.tokens, "completion_tokens": verdict.completion_tokens,
                          "total_tokens": verdict.tokens + verdict.completion_tokens}}

    async def chat_completion(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.answer(await self.aclassify(body))

    async def completion(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.answer(await self.aclassify(body), chat=False)

    async def stream_chat_completion(self, body: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        whole = await self.chat_completion(body)
        for chunk in stream_chunks(whole):
            yield chunk


class EncoderStudent(StudentTeacher):
    """An encoder-classifier student: the most probable label of one forward pass, with ``label_probs``."""

    confidence_kind: Confidence = "label_prob"

    def __init__(self, name: str, artefact: str | Path, *, threads: int = 1) -> None:
        import hashlib

        import torch

        from distillgate.train.encoder import encode_texts, is_encoder_student, load_encoder_student

        directory = student_dir(artefact)
        if not is_encoder_student(directory):
            raise NotFoundError(f"student {name!r} at {directory.name} is not an encoder classifier",
                                hint="load it with load_student(), which picks the family from its card")
        torch.set_num_threads(max(1, threads))
        self._torch = torch
        self._encode = encode_texts
        self._model, self._tokenizer = load_encoder_student(directory)
        self._lock = threading.Lock()
        self.model_name = f"student/{name}"
        self.labels = list(self._model.labels)
        digest = hashlib.sha256()
        for part in (directory / "model.safetensors", directory / "classifier.safetensors"):
            if part.is_file():
                digest.update(part.read_bytes())
        self._card = TeacherCard(model_id=self.model_name, backend=ENCODER_FAMILY, file_sha256=digest.hexdigest(),
                                 parameter_count=int(self._model.card()["parameters"]), source=directory.parent.name
                                 if directory.name == "model" else directory.name,
                                 method={"family": ENCODER_FAMILY, "labels": self.labels,
                                         "serve": self._model.serve})

    def classify(self, text: str) -> Verdict:
        """The label distribution of one text (synchronous; the async calls run it off the event loop)."""
        start = time.perf_counter()
        with self._lock:
            ids, mask = self._encode(self._tokenizer, [text], self._model.max_length)
            with self._torch.inference_mode():
                probs = self._torch.softmax(self._model(ids, mask)[0].float(), dim=-1).tolist()
        labels = self._model.labels
        best = max(range(len(probs)), key=probs.__getitem__)
        return Verdict(labels[best], float(probs[best]), dict(zip(labels, map(float, probs), strict=True)),
                       int(mask.sum()), time.perf_counter() - start)

    async def aclassify(self, body: Mapping[str, Any]) -> Verdict:
        return await asyncio.to_thread(self.classify, user_text(body))

    def card(self) -> TeacherCard:
        return self._card


def load_student(name: str, artefact: str | Path, *, threads: int = 1) -> StudentTeacher:
    """The student saved at ``artefact``, served as ``student/NAME`` in the way its family needs (see above)."""
    if read_card(artefact)["family"] == ENCODER_FAMILY:
        return EncoderStudent(name, artefact, threads=threads)
    from distillgate.teachers.causal_student import CausalStudent

    return CausalStudent(name, student_dir(artefact), threads=threads)


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
