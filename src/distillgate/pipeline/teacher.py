"""The project's local teacher, as the in-process gateway serves it: plain, or retrieval-augmented.

``teacher_loader(pipeline)`` returns the ``local_loader`` the gateway calls (once, off its event loop) the first
time a request names the project's teacher. With ``teacher.retrieval`` it builds a ``RetrievalTeacher`` whose
example pool excludes, by content hash, every row this project labels (the traffic sample) and every row it is
evaluated on (its test and golden splits come out of the traffic; labelled eval files are hashed too), and checks
that exclusion once more on the built pool before the teacher answers anything.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distillgate.teachers.base import Teacher

if TYPE_CHECKING:
    from distillgate.pipeline.run import Pipeline


def _texts(path: Path, column: str) -> list[str]:
    from distillgate.data.ingest import read_records

    return [str(r[column]) for r in read_records(path) if r.get(column) not in (None, "")]


def protected_hashes(pipeline: Pipeline) -> dict[str, set[str]]:
    """Content hashes the pool may never hold, by what they are: the traffic rows being labelled, eval rows."""
    from distillgate.teachers.retrieval import content_hash

    p = pipeline.project
    sample = pipeline.sample_traffic()
    column = p.traffic.columns.get("input", "text")
    out = {"rows being labelled (the traffic sample, which holds the project's test and golden splits)":
           {content_hash(t) for t in _texts(sample, column)}}
    evals: set[str] = set()
    for spec in p.eval.suites:
        suite = pipeline.file_suite(spec.model_copy(update={"sample": None}))  # every row of the file, not a sample
        if suite is not None:
            evals |= {content_hash(item.text) for item in suite.items}
    if evals:
        out["evaluation rows (eval.suites files)"] = evals
    return out


def build_retrieval_teacher(pipeline: Pipeline, base: Teacher | None = None) -> Teacher:
    """The project's retrieval teacher; ``base`` is the model it wraps (default: the local model, loaded now)."""
    from distillgate.data.ingest import read_records
    from distillgate.teachers.loading import cache_root
    from distillgate.teachers.registry import load_teacher
    from distillgate.teachers.retrieval import ExamplePool, PoolIndex, RetrievalSettings, RetrievalTeacher

    p = pipeline.project
    r = p.teacher.retrieval
    assert r is not None
    protected = protected_hashes(pipeline)
    banned = set().union(*protected.values())
    records = list(read_records(p.path(pipeline.base, r.pool.path)))
    if r.pool.limit is not None:
        records = records[:r.pool.limit]
    cols = {"text": "text", "label": "label", **r.pool.columns}
    pool = ExamplePool.from_records(records, source=r.pool.source, licence=r.pool.licence, text_key=cols["text"],
                                    label_key=cols["label"], id_key=cols.get("id"), exclude=banned,
                                    path=str(p.path(pipeline.base, r.pool.path)))
    for what, hashes in protected.items():
        pool.assert_disjoint(hashes, what)
    embedder: Any
    if r.embedder == "minilm":
        from distillgate.extraction.embed import MiniLMEmbedder

        embedder = MiniLMEmbedder(threads=p.teacher.threads or 2)
        embedder_id = "all-MiniLM-L6-v2"
    else:
        from distillgate.extraction.embed import HashingEmbedder

        embedder, embedder_id = HashingEmbedder(), "hashing-256"
    index = PoolIndex(pool, embedder, embedder_id=embedder_id, cache_dir=cache_root() / "pools")
    inner = base if base is not None else load_teacher(p.teacher.model, dtype=p.teacher.dtype,
                                                       threads=p.teacher.threads)
    return RetrievalTeacher(inner, index, RetrievalSettings(k=r.k, candidates=r.candidates, vote_prior=r.vote_prior),
                            model_name=p.teacher.model)


def teacher_loader(pipeline: Pipeline) -> Callable[[str], Teacher] | None:
    """The gateway's ``local_loader`` for this project; None keeps the registry's default."""
    p = pipeline.project
    if p.teacher.upstream:
        return None

    def load(spec: str) -> Teacher:
        from distillgate.teachers.registry import load_teacher

        teacher: Teacher
        if spec == p.teacher.model and p.teacher.retrieval is not None:
            teacher = build_retrieval_teacher(pipeline)
        else:
            teacher = load_teacher(spec, dtype=p.teacher.dtype, threads=p.teacher.threads)
        if spec == p.teacher.model:  # what the report's teacher card shows
            (pipeline.workdir / "teacher_card.json").write_text(json.dumps(teacher.card().as_dict(), indent=2))
        return teacher

    return load
