"""``ExtractionMonitor``: one per gateway process. ``observe(features)`` updates the identity's sliding windows and
returns the signals that fired, cheaply (tens of microseconds, see ``benchmarks/extraction_observe.py``). Prompt
embeddings are computed by a background worker; their drift result applies to the identity's following requests.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import xxhash

from distillgate.extraction.embed import Embedder, Reference
from distillgate.extraction.features import RequestFeatures, Sketch, identities
from distillgate.extraction.state import Events, ScopeState
from distillgate.policy.extraction_rules import SIGNAL_NAMES, ExtractionRules, Signal
from distillgate.policy.model import Policy, PolicySet

RulesFor = Callable[[str | None], ExtractionRules]
ScopeKey = tuple[str, str]


Effective = dict[str, tuple[float, int, int, tuple[str, ...]]]  # name -> (threshold, window, min_requests, scopes)
InScope = list[tuple[str, float, int, int]]  # (name, threshold, window, min_requests) of one scope's signals
_EFFECTIVE: dict[int, tuple[ExtractionRules, Effective, dict[str, InScope]]] = {}


def _effective_entry(rules: ExtractionRules) -> tuple[ExtractionRules, Effective, dict[str, InScope]]:
    """The rules' signal table and its per-scope views (filled as scopes are met), computed once per rules object."""
    hit = _EFFECTIVE.get(id(rules))
    if hit is not None and hit[0] is rules:
        return hit
    table: Effective = {}
    for name in SIGNAL_NAMES:
        rule = rules.rule(name)
        table[name] = (rules.threshold(name), rule.window or 1, rule.min_requests or 1, tuple(rule.scopes))
    if len(_EFFECTIVE) > 256:
        _EFFECTIVE.clear()
    entry = _EFFECTIVE[id(rules)] = (rules, table, {})
    return entry


def _effective(rules: ExtractionRules) -> Effective:
    """(threshold, window, min_requests, scopes) per signal."""
    return _effective_entry(rules)[1]


def _effective_in(rules: ExtractionRules, scope: str) -> InScope:
    """(name, threshold, window, min_requests) of the signals computed for ``scope``."""
    _, table, by_scope = _effective_entry(rules)
    rows = by_scope.get(scope)
    if rows is None:
        rows = by_scope[scope] = [(name, t, w, m) for name, (t, w, m, scopes) in table.items() if scope in scopes]
    return rows


def rules_from(policies: Policy | PolicySet | ExtractionRules | None) -> RulesFor:
    if policies is None:
        default = ExtractionRules()
        return lambda project: default
    if isinstance(policies, ExtractionRules):
        fixed = policies
        return lambda project: fixed
    if isinstance(policies, Policy):
        single = policies.extraction
        return lambda project: single
    return lambda project: policies.select(project).extraction


class ExtractionMonitor:
    """Thread-safe; memory bounded by ``max_scopes`` identities (least recently seen are forgotten)."""

    def __init__(self, policies: Policy | PolicySet | ExtractionRules | None = None, *,
                 embedder: Embedder | None = None, max_scopes: int = 4096, queue_size: int = 4096,
                 background: bool = True, reference_size: int = 200, embed_cache: int = 4096) -> None:
        self._rules_for = rules_from(policies)
        self.embedder = embedder
        self.max_scopes = max_scopes
        self.reference_size = reference_size
        self.embed_cache = embed_cache
        self._vectors: OrderedDict[int, np.ndarray] = OrderedDict()  # xxh64(prompt) -> embedding, LRU
        self.embedded = 0  # prompts actually run through the embedder (cache misses)
        self._scopes: OrderedDict[ScopeKey, ScopeState] = OrderedDict()
        self._references: dict[str, Reference] = {}
        self._bootstrap: dict[str, list[np.ndarray]] = {}
        self._lock = threading.RLock()
        self.dropped = 0  # embedding jobs dropped because the worker was behind
        self._queue: queue.Queue[tuple[Sketch, str] | None] = queue.Queue(maxsize=queue_size)
        self._worker: threading.Thread | None = None
        if embedder is not None and background:
            self._worker = threading.Thread(target=self._work, name="distillgate-extraction-embed", daemon=True)
            self._worker.start()

    # -- references ---------------------------------------------------------------------------------------------------
    def set_reference(self, project: str, texts: Sequence[str] | None = None, *,
                      vectors: np.ndarray | None = None, quantile: float = 0.01) -> Reference:
        """The project's approved traffic (texts, embedded now, or ready vectors) for ``prompt_drift``. Without
        one, the project's first ``reference_size`` embedded prompts become its reference."""
        if vectors is None:
            if self.embedder is None:
                from distillgate.errors import UserError

                raise UserError("set_reference with texts needs an embedder",
                                hint="create the monitor with embedder=MiniLMEmbedder(), or pass vectors=")
            vectors = np.stack(self._embed(list(texts or []))) if texts else np.zeros((0, self.embedder.dim))
        ref = Reference(vectors, quantile)
        with self._lock:
            self._references[project] = ref
        return ref

    def reference(self, project: str) -> Reference | None:
        """The project's ``prompt_drift`` reference, when it has one yet."""
        with self._lock:
            return self._references.get(project)

    # -- the request path ---------------------------------------------------------------------------------------------
    def observe(self, features: RequestFeatures) -> tuple[Signal, ...]:
        """Record one request; return the signals that fired for its identities (before it is forwarded)."""
        return self.observe_request(features)[1]

    def observe_request(self, features: RequestFeatures) -> tuple[Sketch, tuple[Signal, ...]]:
        """``observe``, also returning the request's sketch (for ``log_extra``: the sketch is made once)."""
        sketch = Sketch.of(features)
        signals = self.observe_sketch(sketch)
        if self.embedder is not None and features.prompt:
            item = (sketch, features.prompt)
            if self._worker is None:
                self._embed_batch([item])
            else:
                try:
                    self._queue.put_nowait(item)
                except queue.Full:
                    self.dropped += 1
        return sketch, signals

    def observe_sketch(self, s: Sketch) -> tuple[Signal, ...]:
        """The detectors on a sketch (what ``observe`` and ``audit scan`` share)."""
        rules = self._rules_for(s.project)
        if not rules.enabled:
            return ()
        fp = s.fp_int
        fired: list[Signal] = []
        memo: dict[tuple[str, int, int], bool] = {}  # ring comparisons shared by this request's scopes
        with self._lock:
            scopes = identities(s)
            states = [(scope, ident, self._state(scope, ident, rules)) for scope, ident in scopes]
            project_state = next((st for scope, _, st in states if scope == "project"), None)
            if project_state is not None and s.run is not None:
                project_state.add_run(s.run, max(1, s.n))
            for scope, ident, st in states:
                ev = st.events(s, fp, memo)
                st.add(s, fp, ev)
                if s.embedding is not None:  # scan of a log with stored embeddings
                    self._drift_update(s, [st], s.embedding)
                gate = scope != "project"
                fired.extend(self._values(rules, scope, ident, st, s, ev, project_state, gate))
        return tuple(fired)

    def _state(self, scope: str, ident: str, rules: ExtractionRules) -> ScopeState:
        key = (scope, ident)
        st = self._scopes.pop(key, None)
        if st is None:
            st = ScopeState({name: row[1] for name, row in _effective(rules).items()})
        self._scopes[key] = st
        while len(self._scopes) > self.max_scopes:
            self._scopes.popitem(last=False)
        return st

    def _values(self, rules: ExtractionRules, scope: str, ident: str, st: ScopeState, s: Sketch, ev: Events,
                project_state: ScopeState | None, ungated: bool) -> Iterable[Signal]:
        """The signals of ``scope`` that fire. Values are cheap counters; the evidence is built only for a signal
        that fires (most requests fire none)."""
        for name, threshold, window, min_req in _effective_in(rules, scope):
            value: float | None = None
            contributes = True
            known: Any = None  # what the value was made of, when it is costly: the evidence reuses it
            if name == "volume":
                known = expected, _ = st.expected_records(project_state, s.run)
                if expected:
                    value = st.records / expected
            elif name == "template_sweep":
                n = len(st.twin.items)
                if n >= min_req:
                    value, contributes = st.twin.true / n, ev.twin
            elif name == "logit_bias_sweep":
                if len(st.bias) >= min_req:
                    value, contributes = float(len(st.bias_counts)), s.bias_size > 0
            elif name == "logprob_harvest":
                if len(st.harvest.items) >= min_req:
                    value, contributes = float(st.harvest.true), ev.harvest
            elif name == "reasoning_elicitation":
                n = len(st.cot.items)
                if n >= min_req:
                    value, contributes = st.cot.true / n, ev.cot_unrelated
            elif name == "key_coordination":
                if st.count >= min_req and ev.suspicious:
                    known = keys = st.suspicious_keys(min_req)
                    value, contributes = float(len(keys)), (s.key_id or "") in keys
            elif name == "prompt_drift":
                n = len(st.drift.items)
                if n >= min_req:
                    value, contributes = st.drift.true / n, st.drift.last
            if value is None or value < threshold or not (ungated or contributes):
                continue
            yield Signal(name, float(value), threshold, window, scope, ident, _evidence(name, st, known))

    # -- the background worker ----------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            batch = [item]
            while len(batch) < 64:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    self._queue.task_done()
                    break
                batch.append(nxt)
            try:
                self._embed_batch(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _embed(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Embeddings of ``texts``; identical prompts are embedded once while they stay among the last
        ``embed_cache`` distinct prompts (KD and eval runs send the same prompts again)."""
        assert self.embedder is not None
        keys = [xxhash.xxh64_intdigest(t.encode()) for t in texts]
        with self._lock:
            found = {k: v for k in keys if (v := self._vectors.get(k)) is not None}
        todo = {k: t for k, t in zip(keys, texts, strict=True) if k not in found}
        if todo:
            fresh = self.embedder.embed(list(todo.values()))
            self.embedded += len(todo)
            found.update(zip(todo, fresh, strict=True))
        with self._lock:
            for k in keys:
                if self.embed_cache <= 0:
                    break
                self._vectors[k] = found[k]
                self._vectors.move_to_end(k)
            while len(self._vectors) > self.embed_cache:
                self._vectors.popitem(last=False)
        return [found[k] for k in keys]

    def _embed_batch(self, batch: list[tuple[Sketch, str]]) -> None:
        vectors = self._embed([text for _, text in batch])
        with self._lock:
            for (s, _), vec in zip(batch, vectors, strict=True):
                states = [self._scopes[k] for k in ((sc, i) for sc, i in identities(s)) if k in self._scopes]
                self._drift_update(s, states, vec)

    def _drift_update(self, s: Sketch, states: list[ScopeState], vec: np.ndarray) -> None:
        project = s.project or ""
        ref = self._references.get(project)
        if ref is None:
            boot = self._bootstrap.setdefault(project, [])
            boot.append(vec)
            if len(boot) >= self.reference_size:
                self._references[project] = Reference(np.stack(boot))
                del self._bootstrap[project]
            return
        sim = float(ref.nearest(vec[None, :])[0])
        for st in states:
            st.drift.append(sim < ref.nn_threshold)
            st.drift_sims.append(sim)

    def records_embeddings(self, project: str | None) -> bool:
        """Whether decisions of ``project`` carry a prompt embedding (an embedder and ``record_embeddings``)."""
        return self.embedder is not None and self._rules_for(project).record_embeddings

    def embed_for_record(self, features: RequestFeatures) -> np.ndarray | None:
        """An embedding for ``features_record`` when the policy sets ``extraction.record_embeddings`` (synchronous)."""
        if not self.records_embeddings(features.project):
            return None
        return self._embed([features.prompt])[0]

    @property
    def backlog(self) -> int:
        """Prompts waiting for the background embedder."""
        return self._queue.qsize()

    def drain(self, timeout: float | None = None) -> None:
        """Wait until every queued embedding has been applied (replays and tests)."""
        if self._worker is not None:
            self._queue.join()

    def close(self) -> None:
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(timeout=30)
            self._worker = None


def _evidence(name: str, st: ScopeState, known: Any) -> dict[str, object]:
    """What a fired signal's log entry shows about it; ``known``: what ``_values`` computed for it (volume: the
    expected records and their basis; key_coordination: the suspicious keys)."""
    if name == "volume":
        expected, basis = known
        return {"records": st.records, "expected": expected, "basis": basis}
    if name == "template_sweep":
        return {"near_twins": st.twin.true, "requests": len(st.twin)}
    if name == "logit_bias_sweep":
        return {"distinct_bias_patterns": len(st.bias_counts)}
    if name == "logprob_harvest":
        return {"harvesting_requests": st.harvest.true, "requests": len(st.harvest)}
    if name == "reasoning_elicitation":
        return {"unrelated_reasoning_requests": st.cot.true, "requests": len(st.cot)}
    if name == "key_coordination":
        return {"keys": sorted(known)[:20]}
    if name == "prompt_drift":
        return {"outside_reference": st.drift.true, "embedded": len(st.drift),
                "mean_nn_similarity": round(float(np.mean(st.drift_sims)), 4)}
    return {}


def log_extra(features: RequestFeatures, signals: Sequence[Signal], embedding: np.ndarray | None = None,
              sketch: Sketch | None = None) -> dict[str, object]:
    """What the gateway passes as ``store.admit(..., extra=...)``: the features record and the signals' evidence.
    ``sketch``: the one ``observe_request`` returned for these features (saves making it twice)."""
    from distillgate.extraction.features import features_record

    return {"extraction": {"features": features_record(features, embedding, sketch),
                           "signals": [sig.as_dict() for sig in signals]}}



