"""``ExtractionMonitor``: one per gateway process. ``observe(features)`` updates the identity's sliding windows and
returns the signals that fired, cheaply (tens of microseconds, see ``benchmarks/extraction_observe.py``). Prompt
embeddings are computed by a background worker; their drift result applies to the identity's following requests.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import xxhash

from distillgate.extraction.embed import Embedder, Reference
from distillgate.extraction.features import (
    Embedded,
    RequestFeatures,
    Sketch,
    from_codes,
    identities,
    int8_codes,
)
from distillgate.extraction.state import Events, ScopeState
from distillgate.extraction.stats import outside_shift
from distillgate.extraction.templates import NO_TEMPLATES, Split, TemplateSet
from distillgate.policy.extraction_rules import SIGNAL_NAMES, ExtractionRules, Signal
from distillgate.policy.model import Policy, PolicySet

if TYPE_CHECKING:
    from distillgate.extraction.shared import SharedWindows

RulesFor = Callable[[str | None], ExtractionRules]
ScopeKey = tuple[str, str]
NEW_IDENTITY = 20  # a user with fewer requests in a project than this belongs to the project's "cluster" scope
MMD_EVERY = 50  # embedding_mmd is recomputed after this many new pieces of a project
GATED = ("project", "cluster")
_EVIDENCE = {"distribution_shift": "content", "embedding_mmd": "content", "prompt_drift": "content"}  # scopes whose signals attach only to requests of identities with own evidence
Job = tuple[Sketch, tuple[str, ...], tuple[ScopeKey, ...]]  # what the embedder works on: pieces and scopes


Effective = dict[str, tuple[float, int, int, tuple[str, ...]]]  # name -> (threshold, window, min_requests, scopes)
InScope = list[tuple[str, float, int, int]]  # (name, threshold, window, min_requests) of one scope's signals
_Entry = tuple[ExtractionRules, Effective, dict[str, InScope]]
_EFFECTIVE: dict[int, _Entry] = {}
_NO_EVENTS = Events()  # a cluster scope's: it only reads the windows (never changed)


def _effective_entry(rules: ExtractionRules) -> _Entry:
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


def _in_scope(entry: _Entry, scope: str) -> InScope:
    """(name, threshold, window, min_requests) of the signals computed for ``scope``."""
    _, table, by_scope = entry
    rows = by_scope.get(scope)
    if rows is None:
        rows = by_scope[scope] = [(name, t, w, m) for name, (t, w, m, scopes) in table.items() if scope in scopes]
    return rows


def _quiet_rows(entry: _Entry, scope: str) -> InScope:
    """The rows of ``_in_scope`` a quiet scope computes (see ``_values``): ``volume``'s, the one signal whose value
    is not a window's counter."""
    key = f"{scope}/quiet"
    rows = entry[2].get(key)
    if rows is None:
        rows = entry[2][key] = [row for row in _in_scope(entry, scope) if row[0] == "volume"]
    return rows


QUIET = True  # the quiet-scope fast path of ``_values`` (tests switch it off to compare with the full computation)


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
        self.dropped = 0  # embedding jobs not run (each recorded as unobserved in its decision entry)
        self._flagged: OrderedDict[ScopeKey, None] = OrderedDict()  # identities a signal fired for (bounded)
        self._templates: dict[int, tuple[ExtractionRules, dict[str, TemplateSet]]] = {}
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self._worker: threading.Thread | None = None
        #: other gateway processes' view, when the monitor shares its windows through the store (``share``)
        self.shared: SharedWindows | None = None
        if embedder is not None and background:
            self._worker = threading.Thread(target=self._work, name="distillgate-extraction-embed", daemon=True)
            self._worker.start()

    def share(self, db: str, *, interval_s: float = 0.1, backfill: int = 10_000) -> SharedWindows:
        """Share this monitor's windows with every other process judging requests on ``db`` (workers, replicas):
        each request it judges is published, and theirs are applied here (extraction/shared.py)."""
        from distillgate.extraction.shared import SharedWindows

        if self.shared is None:
            self.shared = SharedWindows(self, db, interval_s=interval_s, backfill=backfill)
        return self.shared

    def absorb(self, s: Sketch) -> None:
        """Apply a request another process judged, as if it had been judged here (its signals are that process's
        to act on; a signal firing here still marks the identity flagged for this process's baselines)."""
        self.observe_sketch(s)

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
            # distinct pieces: a duplicate would be its own leave-one-out neighbour (similarity 1), and the
            # reference's outside threshold would then reject everything not in it verbatim
            pieces = list(dict.fromkeys(p for t in texts or [] for p in self.split(project, t).pieces if p.strip()))
            vectors = np.stack(self._embed(pieces)) if pieces else np.zeros((0, self.embedder.dim))
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

    def templates(self, project: str | None) -> TemplateSet:
        """The approved templates the policy declares for ``project``."""
        rules = self._rules_for(project)
        hit = self._templates.get(id(rules))
        if hit is None or hit[0] is not rules:
            sets: dict[str, TemplateSet] = {}
            for proj, shapes in rules.approved.items():
                merged: dict[str, str] = {}
                for shape in shapes:
                    merged.update(shape.templates)
                sets[proj] = TemplateSet(merged)
            hit = self._templates[id(rules)] = (rules, sets)
        return hit[1].get(project or "", NO_TEMPLATES)

    def split(self, project: str | None, prompt: str) -> Split:
        """What the content signals read of ``prompt``: its variable part against the project's templates."""
        return self.templates(project).split(prompt)

    def prepare(self, features: RequestFeatures) -> tuple[Sketch, Split]:
        """The request's sketch, judged against the project's declared shapes, and its prompt pieces."""
        rules = self._rules_for(features.project)
        split = self.split(features.project, features.prompt)
        declared, resamples, run_size = False, 1, None
        for shape in rules.shapes(features.project):
            if shape.fits(output_type=features.output_type, top_logprobs=int(features.top_logprobs or 0),
                          logprobs=features.logprobs, n=features.n, max_tokens=features.max_tokens) and (
                    not shape.templates or split.template in shape.templates):
                declared, resamples, run_size = True, shape.resamples, shape.run_size
                break
        sketch = Sketch.of(features, text=split.variable if split.template else None, template=split.template,
                           declared=declared, resamples=resamples, run_size=run_size, unseen=split.unseen)
        return sketch, split

    def observe_request(self, features: RequestFeatures, *, wait_s: float = 0.0) -> tuple[Sketch, tuple[Signal, ...]]:
        """``observe``, also returning the request's sketch (for ``log_extra``: the sketch is made once). When the
        embedder is behind, waits up to ``wait_s`` for room in its queue; a request whose prompt still cannot be
        queued is counted in ``dropped`` and ``unobserved(sketch)`` says so (the gateway records it)."""
        sketch, split = self.prepare(features)
        signals, job = self.judge(sketch, split)
        if job is not None and not self.submit(job, wait_s):
            self.count_dropped()
            sketch = replace(sketch, unobserved="embed_backlog")
        return sketch, signals

    def count_dropped(self) -> None:
        with self._lock:
            self.dropped += 1

    def submit(self, job: Job, wait_s: float = 0.0) -> bool:
        """Queue ``job`` for the embedder, waiting up to ``wait_s`` seconds for room; False when it stayed full.
        Without a background worker the job is embedded now."""
        if self._worker is None:
            self._embed_batch([job])
            return True
        try:
            if wait_s > 0:
                self._queue.put(job, timeout=wait_s)
            else:
                self._queue.put_nowait(job)
        except queue.Full:
            return False
        return True

    def judge(self, s: Sketch, split: Split) -> tuple[tuple[Signal, ...], Job | None]:
        """The signals of a prepared request and the embedding job its pieces need (None: nothing to embed)."""
        signals = self.observe_sketch(s)
        if self.shared is not None:
            self.shared.publish(s)
        if self.embedder is None or not any(p.strip() for p in split.pieces):
            return signals, None
        with self._lock:
            keys = list(identities(s))
            user = self._scopes.get(("user", s.user or "")) if s.user else None
            if s.project and user is not None and user.count <= NEW_IDENTITY:
                keys.append(("cluster", s.project))
        return signals, (s, split.pieces, tuple(keys))

    def observe_sketch(self, s: Sketch) -> tuple[Signal, ...]:
        """The detectors on a sketch (what ``observe`` and ``audit scan`` share)."""
        rules = self._rules_for(s.project)
        if not rules.enabled:
            return ()
        entry = _effective_entry(rules)
        fp = s.fp_int
        fired: list[Signal] = []
        memo: dict[tuple[str, int, int], bool] = {}  # ring comparisons shared by this request's scopes
        with self._lock:
            states = [(scope, ident, self._state(scope, ident, entry)) for scope, ident in identities(s)]
            project_state = user_state = None
            for scope, _, st in states:
                if scope == "project":
                    project_state = st
                elif scope == "user":
                    user_state = st
            if s.project and user_state is not None and user_state.count < NEW_IDENTITY:
                states.append(("cluster", s.project, self._state("cluster", s.project, entry)))
            flagged = self._is_flagged(s)
            if project_state is not None and s.run is not None and not flagged:
                project_state.add_run(s.run, max(1, s.n))  # the run-size baseline: unflagged identities only
            events: list[Events] = []
            for scope, _ident, st in states:
                ev = _NO_EVENTS
                if scope != "cluster":
                    ev = st.events(s, fp, memo)
                    st.add(s, fp, ev)
                events.append(ev)
                if s.embedding is not None:  # scan of a log with stored embeddings (one piece: the record's)
                    self._drift_update(s.project or "", [st], [s.embedding], [s.fp_int],
                                       self._may_shape_baseline(s, [st]),
                                       project_state if scope == "project" else None)
            # tenant isolation: a project/cluster signal attaches only to an identity with evidence of the same
            # kind of its own (its own pieces outside the reference for the content signals, its own suspicious
            # word-level events for the others); judged only for a gated signal that would fire
            own = [st for scope, _, st in states if scope == "user" or scope == "key"]
            evidence: dict[str, bool] = {}
            for (scope, ident, st), ev in zip(states, events, strict=True):
                self._values(entry, scope, ident, st, s, ev, project_state, scope not in GATED,
                             own, evidence, fired)
            if fired and any(sig.scope not in GATED for sig in fired):
                self._flag(s, project_state)
        return tuple(fired)

    def _is_flagged(self, s: Sketch | Embedded) -> bool:
        return (("user", s.user or "") in self._flagged) or (("key", s.key_id or "") in self._flagged)

    def _flag(self, s: Sketch, project_state: ScopeState | None) -> None:
        """Remember that a signal fired for this request's user and key: they no longer shape project baselines."""
        for key in (("user", s.user or ""), ("key", s.key_id or "")):
            if key[1]:
                self._flagged[key] = None
                self._flagged.move_to_end(key)
        while len(self._flagged) > 65536:
            self._flagged.popitem(last=False)
        if project_state is not None and s.run is not None:
            project_state.forget_run(s.run)

    def _state(self, scope: str, ident: str, entry: _Entry) -> ScopeState:
        key = (scope, ident)
        scopes = self._scopes
        st = scopes.get(key)
        if st is not None:  # least recently seen first: this one moves to the end
            scopes.move_to_end(key)
            return st
        st = scopes[key] = ScopeState({name: row[1] for name, row in entry[1].items()})
        while len(scopes) > self.max_scopes:
            scopes.popitem(last=False)
        return st

    def _values(self, entry: _Entry, scope: str, ident: str, st: ScopeState, s: Sketch, ev: Events,
                project_state: ScopeState | None, ungated: bool, own: list[ScopeState], evidence: dict[str, bool],
                fired: list[Signal]) -> None:
        """Append the signals of ``scope`` that fire to ``fired``. Values are cheap counters (a count of zero is a
        value of zero, below every threshold); the evidence is built only for a signal that fires (most requests
        fire none), and the identity's own evidence (``own``: its user's and key's states; ``evidence``: what this
        request judged of it already) only for a gated scope's signal that would fire.

        A quiet scope (no near-twin, harvesting, reasoning or drift flag in its windows, no logit_bias pattern, no
        outside-reference shift or MMD above zero, no suspicious event in this request) computes ``volume`` only:
        every other value is None or zero, below every threshold (thresholds are > 0)."""
        if (QUIET and not ev.suspicious and not st.twin.true and not st.harvest.true and not st.cot.true
                and not st.drift.true and not st.bias_counts and st.shift <= 0.0 and st.mmd <= 0.0):
            rows = _quiet_rows(entry, scope)
            if not rows:
                return
        else:
            rows = _in_scope(entry, scope)
        for name, threshold, window, min_req in rows:
            value: float | None = None
            contributes = True
            known: Any = None  # what the value was made of, when it is costly: the evidence reuses it
            if name == "template_sweep":
                flags = st.twin
                if flags.true and len(flags.items) >= min_req:
                    value, contributes = flags.true / len(flags.items), ev.twin
            elif name == "logit_bias_sweep":
                if st.bias_counts and len(st.bias) >= min_req:
                    value, contributes = float(len(st.bias_counts)), s.bias_size > 0
            elif name == "logprob_harvest":
                flags = st.harvest
                if flags.true and len(flags.items) >= min_req:
                    value, contributes = float(flags.true), ev.harvest
            elif name == "reasoning_elicitation":
                flags = st.cot
                if flags.true and len(flags.items) >= min_req:
                    value, contributes = flags.true / len(flags.items), ev.cot_unrelated
            elif name == "prompt_drift":
                flags = st.drift
                if flags.true and len(flags.items) >= min_req:
                    value, contributes = flags.true / len(flags.items), flags.last
            elif name == "distribution_shift":
                if len(st.outside) >= min_req:
                    value = st.shift
            elif name == "volume":
                known = expected, _ = st.expected_records(project_state, s.run)
                if expected:
                    value = st.records / expected
            elif name == "key_coordination":
                if st.count >= min_req and ev.suspicious:
                    known = keys = st.suspicious_keys(min_req)
                    value, contributes = float(len(keys)), (s.key_id or "") in keys
            elif name == "embedding_mmd" and len(st.vectors) >= min_req:
                value = st.mmd
            if value is None or value < threshold or not (ungated or contributes):
                continue
            if not ungated:
                kind = _EVIDENCE.get(name, "words")
                has = evidence.get(kind)
                if has is None:
                    has = evidence[kind] = any(o.content_evidence() if kind == "content" else o.word_evidence()
                                               for o in own)
                if not has:
                    continue
            fired.append(Signal(name, float(value), threshold, window, scope, ident, _evidence(name, st, known)))

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

    def _embed_batch(self, batch: list[Job]) -> None:
        """Embed a batch and apply it. The costly parts — the embedder, each piece's nearest reference neighbour,
        the MMD test — run outside the monitor's lock, so the request path (``observe``) never waits on them.

        A shared monitor applies each vector as the others will (through its int8 share codes) and publishes the
        pieces (``Embedded``); while the project has no reference yet it does not apply them here at all: they
        come back from the store in ``seq`` order, as to every other process, so that every process's bootstrap
        reference is made of the same pieces (``absorb_embedded``)."""
        texts = [p for _, pieces, _ in batch for p in pieces]
        vectors = self._embed(texts)
        shared = self.shared
        prepared = []
        pos = 0
        for s, pieces, scopes in batch:
            vecs, pos = np.stack(vectors[pos:pos + len(pieces)]), pos + len(pieces)  # (P, D)
            codes = None
            if shared is not None:
                codes = int8_codes(vecs)
                vecs = from_codes(codes)
            ref = self._references.get(s.project or "")
            sims = ref.nearest(vecs) if ref is not None else None
            keys = tuple(xxhash.xxh64_intdigest(p.encode()) for p in pieces)
            prepared.append((s, scopes, keys, vecs, codes, ref, sims))
        tests: list[tuple[ScopeState, Any, np.ndarray]] = []
        with self._lock:
            for s, scopes, keys, vecs, codes, ref, sims in prepared:
                project = s.project or ""
                states = [self._scopes[k] for k in scopes if k in self._scopes]
                project_state = self._scopes.get(("project", s.project)) if s.project else None
                if ref is not self._references.get(project):
                    sims = None  # the reference changed meanwhile: compare again, with the new one
                boot = self._may_shape_baseline(s, states)
                if shared is not None and codes is not None:
                    deferred = project not in self._references
                    shared.publish(Embedded(s.user, s.key_id, s.project, scopes, keys, codes, boot), deferred=deferred)
                    if deferred:
                        continue
                self._drift_update(project, states, list(vecs), keys, boot, project_state, sims, tests)
        self._run_mmd(tests)

    def absorb_embedded(self, e: Embedded) -> None:
        """Apply pieces another process embedded (or this one, deferred for want of a reference), as if they had
        been embedded here: the same vectors, the same scopes, the publisher's judgement of the bootstrap."""
        project = e.project or ""
        vecs = e.vectors
        ref = self.reference(project)
        sims = ref.nearest(vecs) if ref is not None else None  # outside the lock, as for a local piece
        tests: list[tuple[ScopeState, Any, np.ndarray]] = []
        with self._lock:
            if ref is not self._references.get(project):
                sims = None
            states = [self._scopes[k] for k in e.scopes if k in self._scopes]
            project_state = self._scopes.get(("project", e.project)) if e.project else None
            self._drift_update(project, states, list(vecs), e.keys, e.boot, project_state, sims, tests)
        self._run_mmd(tests)

    def _run_mmd(self, tests: list[tuple[ScopeState, Any, np.ndarray]]) -> None:
        for project_state, test, window in tests:
            value = test.ratio(window)
            with self._lock:
                project_state.mmd = value

    def _may_shape_baseline(self, s: Sketch | Embedded, states: Sequence[ScopeState]) -> bool:
        """Whether a request's pieces may go into its project's bootstrap reference: not from an identity flagged
        or with evidence of its own (``states[:2]``: its user's and key's)."""
        return not (self._is_flagged(s) or any(st.own_evidence() for st in states[:2]))

    def _drift_update(self, project: str, states: Sequence[ScopeState], vecs: Sequence[np.ndarray],
                      keys: Sequence[int], boot: bool, project_state: ScopeState | None = None,
                      sims: np.ndarray | None = None,
                      tests: list[tuple[ScopeState, Any, np.ndarray]] | None = None) -> None:
        """Apply a request's piece embeddings: its nearest-neighbour similarity (the least similar piece) to each
        scope's drift window, each piece (``keys``: its identity) to the outside-reference windows, and the
        project's MMD window (its test is appended to ``tests`` to run after the lock is released; without
        ``tests`` it runs now). Without a reference yet, the pieces go to the project's bootstrap when ``boot``."""
        ref = self._references.get(project)
        if ref is None:
            if not boot:
                return  # a project's baseline comes from unflagged identities only
            bootstrap = self._bootstrap.setdefault(project, [])
            bootstrap.extend(vecs)
            if len(bootstrap) >= self.reference_size:
                self._references[project] = Reference(np.stack(bootstrap))
                del self._bootstrap[project]
            return
        if sims is None:
            sims = ref.nearest(np.stack(vecs))
        outside = [bool(x < ref.nn_threshold) for x in sims]
        sim = float(sims.min())
        for st in states:
            st.drift.append(sim < ref.nn_threshold)
            st.drift_sims.append(sim)
            for key, flag in zip(keys, outside, strict=True):
                st.add_piece(key, flag)
            st.shift = outside_shift(st.outside.true, len(st.outside), ref.outside_rate)
        if project_state is not None:
            project_state.vectors.extend(vecs)
            project_state.mmd_pending += len(vecs)
            window = project_state.vectors.maxlen or 0
            test = ref.mmd(window)
            if test is not None and len(project_state.vectors) >= window and project_state.mmd_pending >= MMD_EVERY:
                project_state.mmd_pending = 0
                stacked = np.stack(project_state.vectors)
                if tests is None:
                    project_state.mmd = test.ratio(stacked)
                else:
                    tests.append((project_state, test, stacked))

    def records_embeddings(self, project: str | None) -> bool:
        """Whether decisions of ``project`` carry a prompt embedding (an embedder and ``record_embeddings``)."""
        return self.embedder is not None and self._rules_for(project).record_embeddings

    def embed_for_record(self, features: RequestFeatures) -> np.ndarray | None:
        """An embedding for ``features_record`` when the policy sets ``extraction.record_embeddings`` (synchronous):
        of the prompt piece least like the project's reference (its first piece without one)."""
        if not self.records_embeddings(features.project):
            return None
        vecs = self._embed(list(self.split(features.project, features.prompt).pieces))
        ref = self.reference(features.project or "")
        if ref is None or len(vecs) == 1:
            return vecs[0]
        return vecs[int(np.argmin(ref.nearest(np.stack(vecs))))]

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
        if self.shared is not None:
            self.shared.close()
            self.shared = None


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
    if name == "distribution_shift":
        return {"outside_pieces": st.outside.true, "pieces": len(st.outside), "minus_log10_p": round(st.shift, 2)}
    if name == "embedding_mmd":
        return {"mmd_over_threshold": round(st.mmd, 3), "pieces": len(st.vectors)}
    return {}


def log_extra(features: RequestFeatures, signals: Sequence[Signal], embedding: np.ndarray | None = None,
              sketch: Sketch | None = None) -> dict[str, object]:
    """What the gateway passes as ``store.admit(..., extra=...)``: the features record and the signals' evidence.
    ``sketch``: the one ``observe_request`` returned for these features (saves making it twice)."""
    from distillgate.extraction.features import features_record

    out: dict[str, object] = {"features": features_record(features, embedding, sketch),
                              "signals": [sig.as_dict() for sig in signals]}
    reason = unobserved(sketch)
    if reason is not None:
        out["unobserved"] = reason
    return {"extraction": out}


def unobserved(sketch: Sketch | None) -> str | None:
    """Why this request's prompt was not embedded (``embed_backlog``: the embedder stayed full), else None."""
    return sketch.unobserved if sketch is not None else None



