"""Per-identity sliding-window state and the cheap detectors that read it (all O(window) numpy work)."""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from distillgate.extraction.features import MINHASH_PERMS, Sketch

COMPARE_ROWS = 128  # recent prompts a new prompt is compared with (template sweeps, reasoning families)
TWIN_MAX_WORDS = 3  # near-twin: at most this many words differ (exactly, when both word sets are kept), not identical
TWIN_CANDIDATE_SLACK = 6.0  # MinHash pre-filter: rows estimated within TWIN_MAX_WORDS + this are checked exactly
UNRELATED_MAX_MEAN_JACCARD = 0.15
KEY_RECENT = 50
LOCAL_SHIFT = 3.0  # -log10 p of an identity's own outside count that lets a project/cluster shift attach to it
LOCAL_OUTSIDE = 3  # ... and at least this many of its own pieces outside (two early outliers are not evidence)
HARVEST_REPEATS = 4  # a logprob request counts as harvesting from the 5th time its prompt is seen in the window


@dataclass(slots=True)
class Events:
    """What one request contributed, per detector (computed against a scope's state before it is added)."""

    twin: bool = False
    harvest: bool = False
    new_bias_pattern: bool = False
    cot_unrelated: bool = False

    @property
    def suspicious(self) -> bool:
        return self.twin or self.harvest or self.new_bias_pattern or self.cot_unrelated


_MASK64 = (1 << 64) - 1


class Ring:
    """The last ``cap`` MinHash signatures with their word-set sizes and prompt fingerprints (grows on demand).

    ``content`` is a multiset hash of the rows (the sum of their ``Sketch.row_key`` mod 2**64): two rings with the
    same ``content`` and ``size`` hold the same rows, so a comparison made against one holds for the other. A
    request compares its prompt once per distinct ring, not once per scope (user, key, project, run).
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        first = min(8, cap)
        self.mh = np.zeros((first, MINHASH_PERMS), dtype=np.uint8)  # 8-bit minwise hashing (b-bit MinHash)
        self.vocab = np.zeros(first, dtype=np.float32)
        self.fp = np.zeros(first, dtype=np.uint64)
        self.keys = [0] * first
        self.sets: list[frozenset[int] | None] = [None] * first  # exact word sets (None: too long, estimate only)
        self.content = 0
        self.size = 0
        self.pos = 0
        self.last_fp: int | None = None  # the fingerprint of the last row added, and how many rows in a row had it
        self.last_run = 0

    def add(self, mh: np.ndarray, vocab: int, fp: int, key: int = 0,
            word_set: frozenset[int] | None = None) -> None:
        """Add a row: ``mh`` a MinHash signature (uint8 or wider), ``key`` its ``Sketch.row_key``."""
        if self.size == len(self.mh) and self.size < self.cap:
            grow = min(self.cap, 2 * len(self.mh))
            self.mh = np.resize(self.mh, (grow, MINHASH_PERMS))
            self.vocab = np.resize(self.vocab, grow)
            self.fp = np.resize(self.fp, grow)
            self.keys += [0] * (grow - len(self.keys))
            self.sets += [None] * (grow - len(self.sets))
            self.pos = self.size
        if self.size == len(self.mh):  # full: the oldest row leaves
            self.content = (self.content - self.keys[self.pos]) & _MASK64
        self.mh[self.pos] = mh  # a wider signature is cast as astype(np.uint8) casts it (its low byte)
        self.vocab[self.pos] = vocab
        self.fp[self.pos] = fp
        self.keys[self.pos] = key
        self.sets[self.pos] = word_set
        self.content = (self.content + key) & _MASK64
        self.pos = (self.pos + 1) % len(self.mh)
        self.size = min(self.size + 1, len(self.mh))
        if fp == self.last_fp:
            self.last_run += 1
        else:
            self.last_fp, self.last_run = fp, 1

    def has_twin(self, s: Sketch, fp: int) -> bool:
        """Whether a row is a near-twin of ``s``: at most TWIN_MAX_WORDS words apart, yet not the same prompt. The
        MinHash estimate only picks candidates; the decision is the exact word difference when both rows keep their
        word sets (a long shared template made the estimate call 63% of distinct banking77 messages twins)."""
        if self.last_fp == fp and self.last_run >= self.size:
            return False  # every row is this very prompt (a resampling run): no twin, nothing to estimate
        other = self.fp[: self.size] != fp
        if not other.any():
            return False
        j = self.jaccard(s.minhash8)
        a, b = self.vocab[: self.size], float(s.vocab_size)
        inter = j * (a + b) / (1.0 + j)
        delta = a + b - 2.0 * inter
        if s.word_set is None:
            return bool(np.any((delta <= TWIN_MAX_WORDS) & other))
        for i in np.flatnonzero((delta <= TWIN_MAX_WORDS + TWIN_CANDIDATE_SLACK) & other):
            row = self.sets[i]
            if row is None:
                if delta[i] <= TWIN_MAX_WORDS:
                    return True
            elif len(row ^ s.word_set) <= TWIN_MAX_WORDS:
                return True
        return False

    def jaccard(self, mh: np.ndarray) -> np.ndarray:
        """Estimated Jaccard similarity of ``mh``'s word set with each row's (float32, one per row)."""
        mh8 = mh if mh.dtype == np.uint8 else mh.astype(np.uint8)
        same = (self.mh[: self.size] == mh8).sum(axis=1, dtype=np.int32)
        return same.astype(np.float32) * np.float32(1.0 / MINHASH_PERMS)  # type: ignore[no-any-return]


class Flags:
    """A sliding window of booleans with a running count (O(1) per update and per read)."""

    def __init__(self, size: int) -> None:
        self.items: deque[bool] = deque(maxlen=size)
        self.size = size
        self.true = 0

    def append(self, flag: bool) -> None:
        items = self.items
        if len(items) == self.size and items[0]:
            self.true -= 1
        items.append(flag)
        if flag:
            self.true += 1

    def __len__(self) -> int:
        return len(self.items)

    @property
    def last(self) -> bool:
        return bool(self.items) and self.items[-1]


class ScopeState:
    """Sliding windows of one identity (a user, key, project or run)."""

    def __init__(self, windows: dict[str, int]) -> None:
        self.windows = windows
        self.count = 0
        self.records = 0
        self.declared: int | None = None
        self.recent = Ring(COMPARE_ROWS)
        self.cot_recent = Ring(COMPARE_ROWS // 2)
        self.twin = Flags(windows["template_sweep"])
        self.bias: deque[str | None] = deque(maxlen=windows["logit_bias_sweep"])
        self.bias_counts: Counter[str] = Counter()
        self.harvest = Flags(windows["logprob_harvest"])
        self.fps: deque[str] = deque(maxlen=windows["logprob_harvest"])
        self.fp_counts: Counter[str] = Counter()
        self.cot = Flags(windows["reasoning_elicitation"])
        self.drift = Flags(windows["prompt_drift"])
        self.drift_sims: deque[float] = deque(maxlen=windows["prompt_drift"])
        self.outside = Flags(windows["distribution_shift"])  # per embedded piece: outside the approved reference
        self.outside_keys: deque[int] = deque()  # the distinct pieces behind ``outside`` (a repeat is one trial)
        self.outside_seen: Counter[int] = Counter()
        self.shift = 0.0  # -log10 p of the outside count (distribution_shift), updated with each embedding
        self.suspicious = Flags(KEY_RECENT)  # this identity's own recent suspicious events (tenant isolation)
        self.vectors: deque[np.ndarray] = deque(maxlen=windows["embedding_mmd"])  # project scope only
        self.mmd = 0.0  # last embedding_mmd value (project scope)
        self.mmd_pending = 0
        self.key_events: OrderedDict[str, Flags] = OrderedDict()  # key -> recent suspicious flags
        self.run_records: OrderedDict[str, int] = OrderedDict()  # project scope: records per run

    # -- events of a new request against this scope ---------------------------------------------------------------
    def events(self, s: Sketch, fp: int, memo: dict[tuple[str, int, int], bool] | None = None) -> Events:
        """This request's events against the scope's state. ``memo`` shares ring comparisons between the scopes
        of one request (rings with equal content give equal answers; see ``Ring``)."""
        ev = Events()
        memo = {} if memo is None else memo
        if self.recent.size:
            key = ("twin", self.recent.content, self.recent.size)
            twin = memo.get(key)
            if twin is None:
                twin = memo[key] = self.recent.has_twin(s, fp)
            ev.twin = twin
        wants_lp = s.logprobs or s.top_logprobs > 0
        if s.declared:  # a declared shape (e.g. a soft-label KD study): only resampling beyond the declaration
            ev.harvest = wants_lp and self.fp_counts.get(s.prompt_fp, 0) >= max(HARVEST_REPEATS, s.resamples)
        else:
            ev.harvest = wants_lp and (self.fp_counts.get(s.prompt_fp, 0) >= HARVEST_REPEATS
                                       or (s.top_logprobs >= 10 and (s.max_tokens or 0) <= 1))
        ev.new_bias_pattern = s.bias_pattern is not None and s.bias_pattern not in self.bias_counts
        if s.cot and s.task_minhash8 is not None and self.cot_recent.size >= 1:
            key = ("cot", self.cot_recent.content, self.cot_recent.size)
            unrelated = memo.get(key)
            if unrelated is None:
                unrelated = memo[key] = bool(self.cot_recent.jaccard(s.task_minhash8).mean()
                                             < UNRELATED_MAX_MEAN_JACCARD)
            ev.cot_unrelated = unrelated
        return ev

    def add(self, s: Sketch, fp: int, ev: Events) -> None:
        self.count += 1
        self.records += max(1, s.n)
        if s.declared_run_size is not None:
            self.declared = s.declared_run_size
        self.recent.add(s.minhash8, s.vocab_size, fp, s.row_key, s.word_set)
        if s.cot and s.task_minhash8 is not None:
            self.cot_recent.add(s.task_minhash8, s.vocab_size, fp, s.task_row_key)
        self.twin.append(ev.twin)
        _push_counted(self.bias, self.bias_counts, s.bias_pattern)
        self.harvest.append(ev.harvest)
        _push_counted(self.fps, self.fp_counts, s.prompt_fp)
        self.cot.append(ev.cot_unrelated)
        suspicious = ev.suspicious
        self.suspicious.append(suspicious)
        key = s.key_id or ""
        key_events = self.key_events
        flags = key_events.get(key)
        if flags is None:
            flags = key_events[key] = Flags(KEY_RECENT)
            while len(key_events) > 1000:
                key_events.popitem(last=False)
        else:
            key_events.move_to_end(key)
        flags.append(suspicious)

    def add_piece(self, key: int, outside: bool) -> None:
        """One embedded piece for ``distribution_shift``. A piece already in the window is not a new trial: the
        binomial test assumes independent pieces, and an eval run resending its prompts would count each outlier
        once per run (two legitimate XSTest evaluators were flagged that way)."""
        if key in self.outside_seen:
            return
        if len(self.outside) == self.outside.items.maxlen:
            old = self.outside_keys.popleft()
            self.outside_seen[old] -= 1
            if self.outside_seen[old] <= 0:
                del self.outside_seen[old]
        self.outside.append(outside)
        self.outside_keys.append(key)
        self.outside_seen[key] += 1

    def word_evidence(self) -> bool:
        """Half of this identity's own last requests were suspicious by the word-level detectors."""
        return len(self.suspicious) >= 3 and self.suspicious.true * 2 >= len(self.suspicious)

    def content_evidence(self) -> bool:
        """This identity's own embedded pieces lie outside the reference: half of its requests, or an outside
        count with p <= 10^-LOCAL_SHIFT and at least LOCAL_OUTSIDE pieces."""
        drifted = len(self.drift) >= 5 and self.drift.true * 2 >= len(self.drift)
        return drifted or (self.shift >= LOCAL_SHIFT and self.outside.true >= LOCAL_OUTSIDE)

    def own_evidence(self) -> bool:
        """Either kind of evidence (the bootstrap reference takes nothing from such an identity)."""
        return self.word_evidence() or self.content_evidence()

    def forget_run(self, run: str) -> None:
        """A run whose owner was flagged no longer counts in the project's run-size baseline."""
        self.run_records.pop(run, None)

    def add_run(self, run: str, records: int) -> None:
        self.run_records[run] = self.run_records.pop(run, 0) + records
        while len(self.run_records) > 1000:
            self.run_records.popitem(last=False)

    # -- signal values ----------------------------------------------------------------------------------------------
    def suspicious_keys(self, min_requests: int) -> list[str]:
        return [k for k, flags in self.key_events.items()
                if len(flags) >= min(min_requests, KEY_RECENT) and flags.true / len(flags) >= 0.5]

    def expected_records(self, project: ScopeState | None, run: str | None) -> tuple[float | None, str]:
        if self.declared:
            return float(self.declared), "declared run size"
        if project is not None:
            others = [c for r, c in project.run_records.items() if r != run and c >= 20]
            if len(others) >= 3:
                return 3.0 * float(np.median(others)), "3x the project's median run"
        return None, ""


def _push_counted(window: deque[str | None] | deque[str], counts: Counter[str], item: str | None) -> None:
    if window.maxlen is not None and len(window) == window.maxlen:
        old = window[0]
        if old is not None:
            counts[old] -= 1
            if counts[old] <= 0:
                del counts[old]
    window.append(item)  # type: ignore[arg-type]
    if item is not None:
        counts[item] = counts.get(item, 0) + 1  # (Counter's own += calls its __missing__ for a new item)
