"""``RequestFeatures`` (what the gateway knows about one request) and its privacy-preserving log record.

The record (``features_record``) is what the decision log keeps so that ``distillgate audit scan`` can re-run the
detectors offline: a MinHash signature of the prompt's word set, its length, a short fingerprint of the exact
prompt, the logprob / logit_bias shape of the request and the key id. The prompt text itself is never stored.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar, overload

import numpy as np
import xxhash

from distillgate.errors import UserError
from distillgate.minhash import ItemRows, Permutations

RECORD_VERSION = 1
MINHASH_PERMS = 64
EXACT_MAX_WORDS = 256  # prompts (variable parts) up to this many distinct words keep their word set for exact diffs
_WORD_RE = re.compile(r"[a-z0-9']+")
# fixed seed: signatures must be comparable across processes and releases (distillgate.minhash: the one MinHash)
_PERMS = Permutations.make(MINHASH_PERMS, 20240611)
_ROWS = ItemRows(_PERMS)  # the words' permuted values, kept: most of a request's words were seen before
_EMPTY_WORD = xxhash.xxh64_intdigest(b"")  # what a prompt without words hashes as (one empty word)

# phrases that ask a model to spell out its reasoning (chain-of-thought elicitation)
_COT_RE = re.compile(
    r"step[- ]by[- ]step|show (?:your|all|the) (?:work|reasoning|steps)|explain your reasoning|chain[- ]of[- ]thought"
    r"|think (?:it )?through|reason(?:ing)? (?:through|trace)|<think>|walk me through your (?:reasoning|thinking)"
    r"|before answering,? (?:think|reason)|full reasoning|internal monologue|scratchpad",
    re.IGNORECASE,
)


_D = TypeVar("_D")


def frozen(cls: type[_D], values: dict[str, Any]) -> _D:
    """An instance of the frozen dataclass ``cls`` from the values of all its fields: what its generated
    ``__init__`` makes, without that ``__init__``'s one ``object.__setattr__`` call per field (a request makes a
    ``RequestFeatures`` of 14 fields and a ``Sketch`` of 25; each call costs about as much as the rest of a field's
    work). ``values`` must name every field (``tests/test_extraction_signals.py`` checks both classes)."""
    obj = object.__new__(cls)
    obj.__dict__.update(values)
    return obj


@dataclass(frozen=True)
class RequestFeatures:
    """One request as the detectors see it. ``prompt`` is used to build the sketch and is never logged."""

    ts: float
    user: str | None
    key_id: str | None
    project: str | None
    run: str | None
    model: str | None
    output_type: str | None
    prompt: str = field(repr=False)
    top_logprobs: int | None = None
    logprobs: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()
    max_tokens: int | None = None
    n: int = 1
    declared_run_size: int | None = None

    @property
    def prompt_chars(self) -> int:
        return len(self.prompt)

    @classmethod
    def from_openai(cls, body: Mapping[str, Any], *, user: str | None, key_id: str | None, project: str | None,
                    run: str | None, output_type: str | None, ts: float | None = None,
                    declared_run_size: int | None = None, prompt: str | None = None) -> RequestFeatures:
        """Build from an OpenAI chat/completions request body (what the gateway parsed). ``prompt``: the body's
        prompt text when the caller has it already (``prompt_text(body)``)."""
        raw_bias = body.get("logit_bias")
        bias: tuple[tuple[int, float], ...] = ()
        if raw_bias:
            if not isinstance(raw_bias, Mapping):
                raise UserError("logit_bias must be an object mapping token ids to biases",
                                hint='send e.g. {"logit_bias": {"50256": -100}}')
            try:
                bias = tuple(sorted((int(k), float(v)) for k, v in raw_bias.items()))
            except (TypeError, ValueError) as exc:
                raise UserError(f"logit_bias has a non-integer token id or non-numeric bias: {exc}",
                                hint="keys are token ids (integers as strings), values numbers in [-100, 100]") from exc
        if prompt is None:
            from distillgate.policy.decision import prompt_text

            prompt = prompt_text(body)
        top = body.get("top_logprobs")
        logprobs = body.get("logprobs")
        if isinstance(logprobs, int) and not isinstance(logprobs, bool) and top is None:
            top = logprobs  # legacy completions API: logprobs=N means top N
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        return frozen(cls, {
            "ts": time.time() if ts is None else ts, "user": user, "key_id": key_id, "project": project, "run": run,
            "model": body.get("model"), "output_type": output_type, "prompt": prompt,
            "top_logprobs": int(top) if top is not None else None, "logprobs": bool(logprobs) or bool(top),
            "logit_bias": bias, "max_tokens": int(max_tokens) if max_tokens is not None else None,
            "n": int(body.get("n") or 1), "declared_run_size": declared_run_size,
        })


def words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def word_hashes(vocab: set[str]) -> np.ndarray:
    """xxh64 of each word of ``vocab`` (uint64; the empty set hashes as one empty word)."""
    return np.array(_word_hashes(vocab), dtype=np.uint64)


def _word_hashes(vocab: set[str]) -> list[int]:
    """``word_hashes`` as Python ints (what the signature and the exact word set are made of)."""
    return [xxhash.xxh64_intdigest(w.encode()) for w in vocab] if vocab else [_EMPTY_WORD]


def minhash(text: str, vocab: set[str] | None = None, hashes: np.ndarray | list[int] | None = None) -> np.ndarray:
    """MinHash signature (uint32, MINHASH_PERMS values) of the prompt's set of lower-cased words (``hashes``: their
    ``word_hashes``, when the caller has them)."""
    if hashes is None:
        hashes = _word_hashes(vocab if vocab is not None else set(words(text)))
    return _ROWS.signature(hashes if isinstance(hashes, list) else hashes.tolist())


def prompt_fingerprint(text: str, tokens: list[str] | None = None) -> str:
    """16 hex digits of the normalised prompt: equal prompts, equal fingerprint (not reversible in practice)."""
    return xxhash.xxh64_hexdigest(" ".join(tokens if tokens is not None else words(text)).encode())


def bias_pattern(bias: tuple[tuple[int, float], ...]) -> str | None:
    if not bias:
        return None
    return xxhash.xxh64_hexdigest(",".join(f"{t}:{round(b)}" for t, b in bias).encode())


# every _COT_RE alternative contains one of these words: prompts without any skip the (slower) regex
_COT_HINTS = ("step", "show", "reason", "chain", "think", "walk", "monologue", "scratchpad")
_COT_HINTS_RE = re.compile("|".join(_COT_HINTS))  # one scan for any of them (plain substrings)


def elicits_reasoning(text: str) -> bool:
    if _COT_HINTS_RE.search(text.casefold()) is None:
        return False
    return _COT_RE.search(text) is not None


_SENTENCE_RE = re.compile(r"(?<=[.!?:])\s+|\n+")


_STOPWORDS = frozenset(
    ["a", "an", "the", "and", "or", "but", "if", "of", "to", "in", "on", "at", "by", "for", "with", "from", "as", "is", "are", "was", "were", "be", "been", "being", "do", "does", "did", "how", "what", "why", "when", "where", "which", "who", "whom", "whose", "can", "could", "would", "should", "will", "shall", "may", "might", "must", "i", "you", "he", "she", "it", "we", "they", "me", "my", "your", "his", "her", "its", "our", "their", "this", "that", "these", "those", "there", "here", "not", "no", "yes", "so", "than", "then", "too", "very", "just", "about", "into", "over", "under", "up", "down", "out", "all", "any", "some", "each", "every", "please", "tell", "give", "me", "explain"]
)


def task_text(text: str) -> str:
    """The prompt's content words without its reasoning-elicitation sentences: what the task is about."""
    kept = [part for part in _SENTENCE_RE.split(text) if not _COT_RE.search(part)]
    content = [w for w in words(" ".join(kept) or text) if w not in _STOPWORDS]
    return " ".join(content) or text


_T = TypeVar("_T")


class _once(Generic[_T]):
    """``functools.cached_property`` without its lock: Python 3.11's takes a class-wide RLock on every first access
    (3.12 dropped it), and a sketch is made for every request. The values are pure functions of a frozen sketch, so
    two threads computing one at once store the same value. It is kept in the instance's ``__dict__``: later reads
    never reach this descriptor."""

    def __init__(self, fn: Callable[[Any], _T]) -> None:
        self.fn = fn
        self.name = fn.__name__

    @overload
    def __get__(self, obj: None, owner: type | None = None) -> _once[_T]: ...
    @overload
    def __get__(self, obj: object, owner: type | None = None) -> _T: ...
    def __get__(self, obj: object | None, owner: type | None = None) -> _T | _once[_T]:
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


@dataclass(frozen=True)
class Sketch:
    """What the detectors use: derived from ``RequestFeatures`` on the request path, or from a logged record."""

    ts: float
    user: str | None
    key_id: str | None
    project: str | None
    run: str | None
    output_type: str | None
    minhash: np.ndarray
    vocab_size: int
    prompt_chars: int
    prompt_fp: str
    top_logprobs: int
    logprobs: bool
    bias_size: int
    bias_pattern: str | None
    max_tokens: int | None
    n: int
    declared_run_size: int | None
    cot: bool
    task_minhash: np.ndarray | None = None  # MinHash of task_text(prompt), only for reasoning-eliciting prompts
    embedding: np.ndarray | None = None
    template: str | None = None  # id of the approved template the prompt fits (its variable part is what is read)
    declared: bool = False  # the request fits one of the project's declared research shapes
    resamples: int = 1  # times the declared shape lets one prompt be sent in a window
    unseen: int = 0  # prompt pieces beyond what is embedded (recorded, never silently skipped)
    unobserved: str | None = None  # why the prompt was not embedded at all (``embed_backlog``), recorded
    #: the exact word set as xxh64 hashes (``word_hashes``), for exact near-twin diffs; never in the decision log,
    #: shared between gateway processes in ``share_record`` (extraction/shared.py)
    word_set: frozenset[int] | None = field(default=None, repr=False, compare=False)

    # What the detectors' rings store (b-bit MinHash, see state.Ring), computed once per request, not per scope.
    @_once
    def minhash8(self) -> np.ndarray:
        return self.minhash.astype(np.uint8)

    @_once
    def task_minhash8(self) -> np.ndarray | None:
        return None if self.task_minhash is None else self.task_minhash.astype(np.uint8)

    @_once
    def minhash_b64(self) -> str:
        """The record's ``minhash`` (its decision entry's and its shared row's: encoded once)."""
        return _b64(self.minhash)

    @_once
    def fp_int(self) -> int:
        return int(self.prompt_fp, 16)

    def _row_key(self, signature: np.ndarray) -> int:
        """Identity of a ring row this request adds: its signature, word count and fingerprint."""
        return xxhash.xxh64_intdigest(signature.tobytes() + f"{self.vocab_size}:{self.prompt_fp}".encode())

    @_once
    def row_key(self) -> int:
        return self._row_key(self.minhash8)

    @_once
    def task_row_key(self) -> int:
        return 0 if self.task_minhash8 is None else self._row_key(self.task_minhash8)

    @classmethod
    def of(cls, f: RequestFeatures, *, text: str | None = None, template: str | None = None,
           declared: bool = False, resamples: int = 1, run_size: int | None = None, unseen: int = 0) -> Sketch:
        """The sketch of ``f``; ``text``: what the word-level detectors read (the prompt's variable part when it
        fits an approved template, see ``templates.split``), else the whole prompt."""
        text = f.prompt if text is None else text
        tokens = _WORD_RE.findall(text.lower())
        vocab = set(tokens)
        hashes = _word_hashes(vocab)
        cot = elicits_reasoning(text)
        return frozen(cls, {
            "ts": f.ts, "user": f.user, "key_id": f.key_id, "project": f.project, "run": f.run,
            "output_type": f.output_type, "minhash": minhash(text, hashes=hashes), "vocab_size": len(vocab),
            "prompt_chars": len(f.prompt), "prompt_fp": prompt_fingerprint(text, [template or "", *tokens]),
            "top_logprobs": int(f.top_logprobs or 0), "logprobs": f.logprobs, "bias_size": len(f.logit_bias),
            "bias_pattern": bias_pattern(f.logit_bias), "max_tokens": f.max_tokens, "n": f.n,
            "declared_run_size": f.declared_run_size if f.declared_run_size is not None else run_size, "cot": cot,
            "task_minhash": minhash(task_text(text)) if cot else None, "embedding": None, "template": template,
            "declared": declared, "resamples": resamples, "unseen": unseen, "unobserved": None,
            "word_set": (frozenset(hashes) if vocab else frozenset()) if len(vocab) <= EXACT_MAX_WORDS else None,
        })

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "v": RECORD_VERSION, "ts": round(self.ts, 3), "user": self.user, "key_id": self.key_id,
            "project": self.project, "run": self.run, "output_type": self.output_type,
            "minhash": self.minhash_b64,
            "vocab": self.vocab_size, "chars": self.prompt_chars, "fp": self.prompt_fp,
            "top_logprobs": self.top_logprobs, "logprobs": self.logprobs,
            "bias": {"size": self.bias_size, "pattern": self.bias_pattern},
            "max_tokens": self.max_tokens, "n": self.n, "declared_run_size": self.declared_run_size, "cot": self.cot,
        }
        if self.task_minhash is not None:
            rec["task_minhash"] = _b64(self.task_minhash)
        if self.template is not None:
            rec["template"] = self.template
        if self.declared:
            rec["declared"], rec["resamples"] = True, self.resamples
        if self.unseen:
            rec["unseen_pieces"] = self.unseen
        if self.unobserved:
            rec["unobserved"] = self.unobserved
        if self.embedding is not None:
            rec["embedding"] = quantise(self.embedding)
        return rec

    def share_record(self) -> dict[str, Any]:
        """``record()`` plus the exact word set (its hashes): what one gateway process tells the others, so that a
        near-twin is judged exactly the same whichever process saw the earlier prompt."""
        rec = self.record()
        if self.word_set is not None:
            rec["words"] = base64.b64encode(np.array(sorted(self.word_set), dtype="<u8").tobytes()).decode()
        return rec

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Sketch:
        if rec.get("v") != RECORD_VERSION:
            raise UserError(f"extraction record version {rec.get('v')!r} is not supported (want {RECORD_VERSION})",
                            hint="re-run `audit scan` with the distillgate release that wrote the log")
        bias = rec.get("bias") or {}
        emb = rec.get("embedding")
        return cls(
            ts=float(rec["ts"]), user=rec.get("user"), key_id=rec.get("key_id"), project=rec.get("project"),
            run=rec.get("run"), output_type=rec.get("output_type"),
            minhash=_unb64(rec["minhash"]),
            vocab_size=int(rec["vocab"]), prompt_chars=int(rec["chars"]), prompt_fp=str(rec["fp"]),
            top_logprobs=int(rec.get("top_logprobs") or 0), logprobs=bool(rec.get("logprobs")),
            bias_size=int(bias.get("size") or 0), bias_pattern=bias.get("pattern"), max_tokens=rec.get("max_tokens"),
            n=int(rec.get("n") or 1), declared_run_size=rec.get("declared_run_size"), cot=bool(rec.get("cot")),
            task_minhash=_unb64(rec["task_minhash"]) if rec.get("task_minhash") else None,
            embedding=dequantise(emb) if emb is not None else None, template=rec.get("template"),
            declared=bool(rec.get("declared")), resamples=int(rec.get("resamples") or 1),
            unseen=int(rec.get("unseen_pieces") or 0), unobserved=rec.get("unobserved"),
            word_set=frozenset(np.frombuffer(base64.b64decode(rec["words"]), dtype="<u8").tolist())
            if "words" in rec else None,
        )


def _b64(signature: np.ndarray) -> str:
    return base64.b64encode(signature.astype("<u4").tobytes()).decode()


def _unb64(data: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(data), dtype="<u4").astype(np.uint32)


def int8_codes(vectors: np.ndarray) -> np.ndarray:
    """int8 codes of unit vectors (scale 127), any shape."""
    return np.clip(np.round(vectors * 127.0), -127, 127).astype(np.int8)  # type: ignore[no-any-return]


def from_codes(codes: np.ndarray) -> np.ndarray:
    """The unit float32 vectors of ``int8_codes`` (the last axis is the vector; a zero vector stays zero)."""
    v = codes.astype(np.float32) / np.float32(127.0)
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norm > 0, norm, 1.0).astype(np.float32)  # type: ignore[no-any-return]


def quantise(vector: np.ndarray) -> str:
    """int8 quantisation of a unit vector (scale 127), base64: 384 bytes for MiniLM."""
    return base64.b64encode(int8_codes(vector).tobytes()).decode()


def dequantise(data: str) -> np.ndarray:
    return from_codes(np.frombuffer(base64.b64decode(data), dtype=np.int8))


@dataclass(frozen=True)
class Embedded:
    """One request's embedded prompt pieces as the content signals apply them (``prompt_drift``,
    ``distribution_shift``, ``embedding_mmd``, a bootstrap reference): what one gateway process tells the others
    once its embedder has read a prompt (extraction/shared.py), so that they apply the same vectors to the same
    scopes without embedding the text again. Never the text: int8 vector codes and 64-bit hashes of the pieces."""

    user: str | None
    key_id: str | None
    project: str | None
    scopes: tuple[tuple[str, str], ...]  # the (scope, identity) windows the pieces apply to, as the publisher chose
    keys: tuple[int, ...]  # xxh64 of each piece's text: a repeated piece is one trial of distribution_shift
    codes: np.ndarray  # (P, D) int8: ``int8_codes`` of the pieces' unit embeddings
    boot: bool = True  # the publisher's judgement: these pieces may shape the project's bootstrap reference

    @_once
    def vectors(self) -> np.ndarray:
        """(P, D) float32 unit vectors: what every process applies, the publisher included."""
        return from_codes(self.codes)

    def share_record(self) -> dict[str, Any]:
        d = self.codes.shape[1]
        return {"v": RECORD_VERSION, "kind": "embedded", "user": self.user, "key_id": self.key_id,
                "project": self.project, "scopes": [list(k) for k in self.scopes],
                "keys": base64.b64encode(np.array(self.keys, dtype="<u8").tobytes()).decode(),
                "dim": d, "codes": base64.b64encode(self.codes.tobytes()).decode(), "boot": self.boot}

    @classmethod
    def from_record(cls, rec: Mapping[str, Any]) -> Embedded:
        if rec.get("v") != RECORD_VERSION or rec.get("kind") != "embedded":
            raise UserError(f"not an embedded-pieces record of version {RECORD_VERSION}: "
                            f"{rec.get('kind')!r} v{rec.get('v')!r}", hint="run one distillgate release per store")
        keys = tuple(np.frombuffer(base64.b64decode(rec["keys"]), dtype="<u8").tolist())
        codes = np.frombuffer(base64.b64decode(rec["codes"]), dtype=np.int8).reshape(len(keys), int(rec["dim"]))
        return cls(user=rec.get("user"), key_id=rec.get("key_id"), project=rec.get("project"),
                   scopes=tuple((str(a), str(b)) for a, b in rec["scopes"]), keys=keys, codes=codes,
                   boot=bool(rec.get("boot", True)))


def features_record(features: RequestFeatures, embedding: np.ndarray | None = None,
                    sketch: Sketch | None = None) -> dict[str, Any]:
    """The compact, privacy-preserving record the gateway stores in the decision entry (``extra["extraction"]``).

    Pass the ``sketch`` the monitor already made of these features (``ExtractionMonitor.observe_request``) to skip
    computing it again."""
    sketch = sketch if sketch is not None else Sketch.of(features)
    if embedding is not None:
        sketch = replace(sketch, embedding=embedding)
    return sketch.record()


def identities(s: Sketch) -> list[tuple[str, str]]:
    """The scopes a request belongs to: its user, key, project and (project-qualified) run."""
    out = []
    if s.user:
        out.append(("user", s.user))
    if s.key_id:
        out.append(("key", s.key_id))
    if s.project:
        out.append(("project", s.project))
        if s.run:
            out.append(("run", f"{s.project}/{s.run}"))
    return out
