"""``RetrievalTeacher``: a local teacher that is shown the k nearest labelled examples before it answers.

A small instruction model is a weak classifier on its own (SmolLM2-135M-Instruct: ~3 % on a 77-intent task
zero-shot). Shown the labelled examples nearest to the message, as earlier turns of the chat, it mostly has to
pick among a handful of plausible labels, which it does well. This module is that teacher:

* an **example pool** (``ExamplePool``): labelled texts from a file the project declares, with its own source and
  licence. Every row carries the content hash of its text (``content_hash``: Unicode NFKC, case-folded, whitespace
  collapsed). Rows whose hash is in the *excluded* set (the rows being labelled, every evaluation / golden / test
  row) are dropped when the pool is built, and a query whose own hash is in the pool never sees itself;
  ``ExamplePool.assert_disjoint`` is the check callers run (``DatasetGuardError`` when it fails);
* an **index** (``PoolIndex``): unit-norm sentence embeddings of the pool (all-MiniLM-L6-v2 by default, injected as
  any ``Embedder``), cached on disk under a key made of the embedder's id and every pool row's id and hash;
* the **prompt** (``retrieval_messages``): the request's system message, then the k neighbours as user/assistant
  turns, *farthest first, nearest last* (the nearest example sits next to the question), then the question.
  One-user-turn formats ("Message: … / Intent: …" lines) scored 12 points lower in the feasibility study;
* **the neighbours' vote** (``vote_prior``, beta): the model's distribution over the scored labels is multiplied
  by each label's share of the k neighbours to the power beta and renormalised (``combine_with_votes``); 1, the
  default, weighs the retrieval and the model alike, 0 is the model alone;
* **candidate narrowing**: with ``candidates: neighbours`` only the labels the neighbours carry (and that the
  request offers) are scored, each as the continuation of the prompt; the others get probability 0. With ``all``
  every offered label is scored. When the neighbours all carry one label there is nothing to choose: that label
  gets probability 1 (as scoring a single label would give) and the model is not run;

The teacher is a ``Teacher`` like any other and sits behind the gateway: a request is judged, logged and stamped
before retrieval runs, and the answer's choice carries ``shown_examples`` (the pool ids shown, nearest last), which
the gateway writes into the decision log's settlement entry. Requests without ``label_choices`` (free text) go to
the wrapped model unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
import unicodedata
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from distillgate.errors import DatasetGuardError, UpstreamError, UserError
from distillgate.teachers import wire
from distillgate.teachers.base import Teacher, TeacherCard

Candidates = Literal["neighbours", "all"]


def content_hash(text: str) -> str:
    """SHA-256 of a text's normalised content: NFKC, case-folded, runs of whitespace as one space, trimmed.

    Two texts that differ only by case or spacing are the same example: the pool guard compares these hashes.
    """
    norm = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).casefold()).strip()
    return hashlib.sha256(norm.encode("utf-8")).hexdigest()


class Embedder(Protocol):
    """Unit-norm sentence embeddings (``distillgate.extraction.embed.MiniLMEmbedder`` is the default)."""

    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


@dataclass(frozen=True)
class PoolRow:
    example_id: str
    text: str
    label: str
    hash: str


@dataclass(frozen=True)
class ExamplePool:
    """Labelled examples the teacher may be shown, with where they came from."""

    rows: tuple[PoolRow, ...]
    source: str
    licence: str
    path: str = ""
    excluded: int = 0  # rows dropped because their content hash was excluded

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]], *, source: str, licence: str,
                     text_key: str = "text", label_key: str = "label", id_key: str | None = None,
                     exclude: Collection[str] = (), path: str = "") -> ExamplePool:
        """Pool rows from plain records; rows whose content hash is in ``exclude`` are left out (and counted).

        Duplicate texts keep their first occurrence; a row without text or label is an error naming it.
        """
        banned = set(exclude)
        rows: list[PoolRow] = []
        seen: set[str] = set()
        dropped = 0
        for i, rec in enumerate(records):
            text, label = rec.get(text_key), rec.get(label_key)
            if not isinstance(text, str) or not text.strip() or label in (None, ""):
                raise UserError(f"example pool {path or source!r}: record {i} has no {text_key!r} or {label_key!r}",
                                hint=f"every pool record needs a non-empty {text_key!r} and {label_key!r} "
                                "(set teacher.retrieval.pool.columns)")
            h = content_hash(text)
            if h in banned:
                dropped += 1
                continue
            if h in seen:
                continue
            seen.add(h)
            example_id = str(rec[id_key]) if id_key and rec.get(id_key) not in (None, "") else f"pool-{i}"
            rows.append(PoolRow(example_id, text, str(label), h))
        if not rows:
            raise UserError(f"example pool {path or source!r} is empty after excluding {dropped} row(s)",
                            hint="the pool must hold labelled examples other than the rows being labelled and "
                            "the evaluation rows")
        return cls(tuple(rows), source, licence, path, dropped)

    @property
    def hashes(self) -> frozenset[str]:
        return frozenset(r.hash for r in self.rows)

    @property
    def labels(self) -> list[str]:
        return sorted({r.label for r in self.rows})

    def digest(self) -> str:
        """A SHA-256 over every row's id, hash and label: what the embedding cache and the card are keyed by."""
        h = hashlib.sha256()
        for r in self.rows:
            h.update(f"{r.example_id}\x00{r.hash}\x00{r.label}\n".encode())
        return h.hexdigest()

    def assert_disjoint(self, hashes: Collection[str], what: str) -> None:
        """Raise ``DatasetGuardError`` if any pool row has one of ``hashes`` (``what`` names them)."""
        clash = [r.example_id for r in self.rows if r.hash in hashes]
        if clash:
            raise DatasetGuardError(
                f"the example pool holds {len(clash)} of the {what}: {', '.join(clash[:5])}"
                + (" …" if len(clash) > 5 else ""),
                hint="the teacher may never be shown a row it labels or a row it is evaluated on; build the pool "
                "with exclude= those rows' content hashes")


class PoolIndex:
    """The pool's embeddings (N, D), cached on disk by text; exact nearest-neighbour search.

    The cache is one file per embedder (``embeddings-<embedder>.npz``: content hashes and their vectors), so a pool
    that loses other rows to exclusion next time (another traffic sample) embeds nothing new. Texts not in the cache
    are embedded and added; the file is written whole and renamed, and a damaged one is recomputed, never trusted.
    """

    def __init__(self, pool: ExamplePool, embedder: Embedder, *, embedder_id: str,
                 cache_dir: Path | None = None) -> None:
        self.pool = pool
        self.embedder = embedder
        self.embedder_id = embedder_id
        self.cache_path: Path | None = None
        self.cache_hit = False  # every pool text came from the cache
        self.embedded = 0  # texts embedded now
        self._hash_pos = {r.hash: i for i, r in enumerate(pool.rows)}
        if cache_dir is not None:
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", embedder_id)
            self.cache_path = Path(cache_dir) / f"embeddings-{safe}.npz"
        self.vectors = self._load_or_embed()

    def _read_cache(self) -> dict[str, np.ndarray]:
        if self.cache_path is None or not self.cache_path.is_file():
            return {}
        try:
            with np.load(self.cache_path, allow_pickle=False) as data:
                hashes, vectors = data["hashes"], data["vectors"]
        except (OSError, ValueError, KeyError):
            return {}  # a damaged cache file is recomputed, never trusted
        if vectors.ndim != 2 or len(hashes) != len(vectors) or not np.isfinite(vectors).all():
            return {}
        return {str(h): v for h, v in zip(hashes.tolist(), vectors, strict=True)}

    def _load_or_embed(self) -> np.ndarray:
        known = self._read_cache()
        missing = [r for r in self.pool.rows if r.hash not in known]
        if missing:
            fresh = np.asarray(self.embedder.embed([r.text for r in missing]), dtype=np.float32)
            if fresh.shape[0] != len(missing):
                raise UserError(f"the embedder returned {fresh.shape[0]} vectors for {len(missing)} pool rows",
                                hint="the embedder must return one row per text")
            known.update({r.hash: v for r, v in zip(missing, fresh, strict=True)})
            self.embedded = len(missing)
            if self.cache_path is not None:
                self.cache_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.cache_path.with_name(self.cache_path.name + ".tmp.npz")
                keys = sorted(known)
                np.savez(tmp, hashes=np.array(keys), vectors=np.stack([known[k] for k in keys]))
                tmp.replace(self.cache_path)  # written whole, then renamed: a crash leaves no half file
        self.cache_hit = not missing
        return np.stack([known[r.hash] for r in self.pool.rows]).astype(np.float32)

    def nearest(self, text: str, k: int) -> list[tuple[PoolRow, float]]:
        """The k most similar pool rows to ``text`` (cosine), nearest first; the text itself is never returned."""
        query = np.asarray(self.embedder.embed([text]), dtype=np.float32)[0]
        sims = self.vectors @ query  # (N,)
        own = self._hash_pos.get(content_hash(text))
        if own is not None:
            sims[own] = -np.inf  # a message is never its own example
        k = min(k, int(np.isfinite(sims).sum()))
        top = np.argpartition(-sims, k - 1)[:k] if k < len(sims) else np.arange(len(sims))
        order = top[np.argsort(-sims[top], kind="stable")][:k]
        return [(self.pool.rows[int(i)], float(sims[int(i)])) for i in order]


def retrieval_messages(messages: Sequence[Mapping[str, str]],
                       neighbours: Sequence[PoolRow]) -> list[dict[str, str]]:
    """The chat the model scores: system messages, then each neighbour as a user/assistant pair, **farthest first,
    nearest last** (``neighbours`` come nearest first), then the request's final user message."""
    msgs = [dict(m) for m in messages]
    if not msgs or msgs[-1].get("role") != "user":
        raise UpstreamError("a retrieval teacher needs the last message to be the user's question", status=400)
    head = [m for m in msgs[:-1] if m.get("role") in ("system", "developer")]
    turns: list[dict[str, str]] = []
    for row in reversed(list(neighbours)):
        turns += [{"role": "user", "content": row.text}, {"role": "assistant", "content": row.label}]
    return head + turns + [msgs[-1]]


def narrow(offered: Sequence[str], neighbours: Sequence[PoolRow], mode: Candidates) -> list[str]:
    """The labels to score: the offered ones the neighbours carry (offered order), or all when none match."""
    if mode == "all":
        return list(offered)
    near = {r.label for r in neighbours}
    chosen = [lab for lab in offered if lab in near]
    return chosen or list(offered)


class LabelModel(Protocol):
    """What the retrieval teacher needs from the model: label scoring of chat prompts (``LocalTeacher``)."""

    model_name: str

    async def score_labels(self, messages: Any, labels: Sequence[str], *,
                           length_normalise: bool = False) -> tuple[dict[str, float], int]: ...


@dataclass(frozen=True)
class RetrievalSettings:
    k: int = 16
    candidates: Candidates = "neighbours"
    vote_prior: float = 1.0  # beta: p(label) ∝ p_model(label) * (neighbours carrying it / k) ** beta; 0 = model alone

    def check(self) -> None:
        if not 1 <= self.k <= 64:
            raise UserError(f"retrieval k must be 1..64, got {self.k}", hint="k: 16 is the measured default")
        if not 0 <= self.vote_prior <= 16:
            raise UserError(f"retrieval vote_prior must be 0..16, got {self.vote_prior}",
                            hint="1 weighs the neighbours' vote and the model's distribution alike; 0 is the "
                            "model alone")


def combine_with_votes(probs: Mapping[str, float], neighbours: Sequence[PoolRow], beta: float) -> dict[str, float]:
    """The model's distribution over the scored labels times the neighbours' vote share to the power ``beta``,
    renormalised: ``p(l) ∝ p_model(l) · (n_l / k)^beta``. A scored label no neighbour carries (``candidates: all``)
    counts half a vote, so the model can still pick it. ``beta = 0`` returns the model's distribution."""
    if beta == 0 or not probs:
        return dict(probs)
    votes: dict[str, float] = {}
    for row in neighbours:
        votes[row.label] = votes.get(row.label, 0.0) + 1.0
    k = max(len(neighbours), 1)
    raw = {lab: p * ((votes.get(lab, 0.5)) / k) ** beta for lab, p in probs.items()}
    total = sum(raw.values())
    if total <= 0 or not math.isfinite(total):
        return dict(probs)
    return {lab: v / total for lab, v in raw.items()}


@dataclass
class RetrievalTeacher(Teacher):
    """A label-scoring model shown its k nearest labelled examples; free-text requests pass through."""

    inner: Any  # a Teacher that is also a LabelModel (LocalTeacher)
    index: PoolIndex
    settings: RetrievalSettings = field(default_factory=RetrievalSettings)
    model_name: str = ""
    requests: int = 0
    single_candidate: int = 0  # label requests whose neighbours all carried one label (the model was not run)

    def __post_init__(self) -> None:
        self.settings.check()
        self.model_name = self.model_name or self.inner.model_name

    def card(self) -> TeacherCard:
        base: TeacherCard = self.inner.card()
        pool = self.index.pool
        method = {
            "kind": "retrieval-augmented label scoring",
            "what": f"{base.model_id} shown the {self.settings.k} nearest labelled pool examples as chat turns "
                    "(farthest first, nearest last); each candidate label scored as the continuation"
                    + (f", times the neighbours' vote share to the power {self.settings.vote_prior:g}"
                       if self.settings.vote_prior else ""),
            "k": self.settings.k, "candidates": self.settings.candidates, "vote_prior": self.settings.vote_prior,
            "embedder": self.index.embedder_id,
            "pool": {"source": pool.source, "licence": pool.licence, "path": pool.path, "rows": len(pool.rows),
                     "excluded_rows": pool.excluded, "sha256": pool.digest()},
            "strength": "most of its accuracy comes from retrieval over the labelled pool; the model adds signal "
                        "where the neighbours disagree (when all k carry one label, that label is the answer and "
                        "the model is not run)",
            "measured": "accuracy on the project's own test split is in the run report (teacher vs gold); "
                        "benchmarks/study_banking77.py measures it by strategy (zero-shot, k=8/16, candidates)",
        }
        return replace(base, backend=f"retrieval+{base.backend}", method=method)

    async def _label_completion(self, body: Mapping[str, Any], labels: list[str], mean: bool) -> dict[str, Any]:
        req = wire.parse_chat(body)
        if req.stream or req.n != 1:
            raise UpstreamError("label_choices answers one non-streamed choice (n=1, stream=false)", status=400)
        question = req.messages[-1].get("content", "") if req.messages else ""
        found = await asyncio.to_thread(self.index.nearest, str(question), self.settings.k)
        neighbours = [row for row, _ in found]
        prompt = retrieval_messages(req.messages, neighbours)
        scored = narrow(labels, neighbours, self.settings.candidates)
        if len(scored) == 1:
            # one candidate: a distribution over one label is 1.0 whatever the model says, so it is not run
            # (the same answer, without the cost of the prompt: no prompt tokens are processed)
            probs, prompt_tokens = {scored[0]: 1.0}, 0
            self.single_candidate += 1
        else:
            probs, prompt_tokens = await self.inner.score_labels(prompt, scored, length_normalise=mean)
            probs = combine_with_votes(probs, neighbours, self.settings.vote_prior)
        full = {lab: float(probs.get(lab, 0.0)) for lab in labels}
        best = max(full, key=full.__getitem__)
        self.requests += 1
        resp = wire.label_response(self.model_name, self.fingerprint(), full, prompt_tokens,
                                   max(1, len(best.split())))
        resp["choices"][0]["shown_examples"] = [row.example_id for row in reversed(neighbours)]
        resp["choices"][0]["scored_labels"] = scored
        return resp

    def fingerprint(self) -> str:
        inner = getattr(self.inner, "fingerprint", None)
        base = inner() if callable(inner) else "dg"
        prior = f"-v{self.settings.vote_prior:g}" if self.settings.vote_prior else ""
        return f"{base}-knn{self.settings.k}{prior}-{self.index.pool.digest()[:8]}"

    async def chat_completion(self, body: Mapping[str, Any]) -> dict[str, Any]:
        if body.get("label_choices") is None:
            result: dict[str, Any] = await self.inner.chat_completion(body)
            return result
        labels = wire.parse_label_choices(body.get("label_choices"))
        mean = wire.parse_label_score(body.get("label_score"))
        rest = {k: v for k, v in body.items() if k not in ("label_choices", "label_score")}
        return await self._label_completion(rest, labels, mean)

    def stream_chat_completion(self, body: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        stream: AsyncIterator[dict[str, Any]] = self.inner.stream_chat_completion(body)
        return stream

    async def completion(self, body: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.inner.completion(body)
        return result

    async def aclose(self) -> None:
        await self.inner.aclose()
