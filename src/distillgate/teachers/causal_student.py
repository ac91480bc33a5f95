"""A causal-LM student (``train.student.family: causal_lm``) served as ``student/NAME``.

The model directory (``model/`` of the run's output) is a Hugging Face causal LM; ``run.json`` beside it is the card:
the label set (``config.labels``) and the prompt settings the student was trained with. It runs on the local
teacher's machinery (``LocalModel`` + ``LocalTeacher``: one worker thread, batched label scoring and generation).

* **Label student** (the run had ``labels``): the verdict scores every label as the continuation of the prompt --
  ``p(label | prompt) ∝ exp(Σ log p(label tokens + EOS))``, the local teacher's ``label_choices`` rule and the one
  ``distillgate eval`` scores a causal student with -- and answers the most probable label, with ``label_probs``
  on the choice; confidence ``label_prob`` = that label's probability.
* **Text student** (no labels): the verdict is a generation with the request's sampling settings; confidence
  ``mean_token_prob`` = exp(mean log-probability of the generated tokens). Direct requests are answered as the
  local teacher answers them (``n``, ``logprobs``, ``/v1/completions``); a stream is the whole answer in chunks.

The student sees a request the way it saw its training rows: with ``prompt.chat_template`` (the default) and a
tokenizer that has one, the request's messages through that template (generation prompt added); otherwise the
plain text ``"\\n\\n".join(contents) + "\\n"``. A completion's ``prompt`` counts as one user message. The request
is expected to carry the prompt the teacher was asked with (the dataset's template already applied), as the
teacher's traffic does.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from distillgate.errors import UpstreamError
from distillgate.teachers import wire
from distillgate.teachers.base import TeacherCard
from distillgate.teachers.engine import Generation, LocalModel, Prompt, SamplingParams
from distillgate.teachers.local import LocalTeacher
from distillgate.teachers.student import CAUSAL_FAMILY, Confidence, StudentTeacher, Verdict, read_card


class CausalStudent(StudentTeacher):
    """A causal-LM student behind the student interface (see the module docstring)."""

    def __init__(self, name: str, directory: str | Path, *, threads: int = 1, max_batch: int = 8) -> None:
        import torch

        from distillgate.teachers.loading import ModelSource, load_model

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        torch.set_num_threads(max(1, threads))
        folder = Path(directory)
        card = read_card(folder)
        self.model_name = f"student/{name}"
        self.labels = list(card["labels"]) if card["labels"] else None
        self.confidence_kind: Confidence = "label_prob" if self.labels else "mean_token_prob"
        loaded = load_model(ModelSource(self.model_name, "hf_dir", folder), use_cache=False)
        engine = LocalModel(loaded.model, loaded.tokenizer, loaded.card, model_name=self.model_name)
        self._templated = bool(card["prompt"].get("chat_template", True)) and bool(loaded.tokenizer.chat_template)
        self._local = LocalTeacher(engine, max_batch=max_batch)
        self._card = dataclasses.replace(
            loaded.card, backend=CAUSAL_FAMILY, source=folder.parent.name if folder.name == "model" else folder.name,
            method={"family": CAUSAL_FAMILY, "task": card["task"], "labels": self.labels,
                    "confidence": self.confidence_kind, "recipe": card["recipe"]})

    # ------------------------------------------------------------------ prompts
    def _prompt(self, messages: Sequence[Mapping[str, str]]) -> Prompt:
        """The request as the student was trained to see it (chat template, or the plain-text join)."""
        if self._templated:
            return [dict(m) for m in messages]
        return "\n\n".join(str(m.get("content", "")) for m in messages) + "\n"

    def _request(self, body: Mapping[str, Any]) -> tuple[Prompt, SamplingParams]:
        """(prompt, sampling) of a request for a verdict: one prompt, one choice."""
        if "messages" in body:
            chat = wire.parse_chat(body)
            if chat.n != 1:
                raise UpstreamError("a student's verdict answers one choice (n=1)", status=400)
            return self._prompt(chat.messages), chat.params
        done = wire.parse_completion(body)
        if done.n != 1 or len(done.prompts) != 1:
            raise UpstreamError("a student's verdict answers one prompt with one choice (n=1)", status=400)
        return self._prompt([{"role": "user", "content": done.prompts[0]}]), done.params

    # ------------------------------------------------------------------ verdicts
    async def aclassify(self, body: Mapping[str, Any]) -> Verdict:
        prompt, params = self._request(body)
        start = time.perf_counter()
        if self.labels is not None:
            engine = self._local.engine
            room = engine.context_length - max(len(engine.tokenizer(lab, add_special_tokens=False)["input_ids"]) + 1
                                               for lab in self.labels)
            if len(engine.encode(prompt)) > room:  # positions past the context are garbage, and a long one is slow
                raise UpstreamError(f"the prompt does not fit {self.model_name}'s context ({engine.context_length} "
                                    "tokens with its longest label)", status=400)
            probs, prompt_tokens = await self._local.score_labels(prompt, self.labels)
            best = max(self.labels, key=probs.__getitem__)
            answer_tokens = len(self._local.engine.tokenizer(best, add_special_tokens=False)["input_ids"])
            return Verdict(best, float(probs[best]), {k: float(v) for k, v in probs.items()}, prompt_tokens,
                           time.perf_counter() - start, completion_tokens=answer_tokens)
        (gen,) = await self._local.generate([prompt], [dataclasses.replace(params, logprobs=True)])
        return Verdict(gen.text, mean_token_prob(gen), {}, gen.prompt_tokens, time.perf_counter() - start,
                       completion_tokens=gen.completion_tokens, finish_reason=gen.finish_reason)

    # ------------------------------------------------------------- direct calls
    async def chat_completion(self, body: Mapping[str, Any]) -> dict[str, Any]:
        if self.labels is not None:
            return self.answer(await self.aclassify(body))
        req = wire.parse_chat(body)
        gens = await self._local.generate([self._prompt(req.messages)] * req.n,
                                          [wire.choice_params(req.params, j) for j in range(req.n)])
        return wire.chat_response(self.model_name, self._local.fingerprint(), gens)

    async def completion(self, body: Mapping[str, Any]) -> dict[str, Any]:
        if self.labels is not None:
            return self.answer(await self.aclassify(body), chat=False)
        req = wire.parse_completion(body)
        prompts = [self._prompt([{"role": "user", "content": p}]) for p in req.prompts for _ in range(req.n)]
        gens = await self._local.generate(prompts, [wire.choice_params(req.params, j % req.n)
                                                    for j in range(len(prompts))])
        return wire.completion_response(self.model_name, self._local.fingerprint(), req.prompts, req.n, gens,
                                        req.echo)

    def card(self) -> TeacherCard:
        return self._card

    async def aclose(self) -> None:
        await self._local.aclose()


def mean_token_prob(gen: Generation) -> float:
    """exp(mean log-probability of the generated tokens); 0 for an empty generation (nothing to be sure of)."""
    if not gen.logprobs:
        return 0.0
    return math.exp(sum(lp.logprob for lp in gen.logprobs) / len(gen.logprobs))
