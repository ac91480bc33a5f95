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
_NO_ROW = np.zeros(MINHASH_PERMS, dtype=np.uint8)  # an empty slot's row in the signatures block


class Ring:
    """The last ``cap`` MinHash signatures with their word-set sizes and prompt fingerprints (grows on demand).

    ``content`` is a multiset hash of the rows (the sum of their ``Sketch.row_key`` mod 2**64): two rings with the
    same ``content`` and ``size`` hold the same rows, so a comparison made against one holds for the other. A
    request compares its prompt once per distinct ring, not once per scope (user, key, project, run).

    Only the signatures are a numpy block (what ``jaccard`` compares); word counts, fingerprints, keys and word sets
    are Python lists (a numpy item store costs about as much as a small array operation), the word counts made an
    array only when a comparison needs them.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        first = min(8, cap)
        self._mh = np.zeros((first, MINHASH_PERMS), dtype=np.uint8)  # 8-bit minwise hashing (b-bit MinHash)
        self.rows: list[np.ndarray | None] = [None] * first  # each slot's signature (uint8), as added
        self._pending: list[int] = []  # slots whose row is not in ``_mh`` yet (written when a comparison reads it)
        self.vocabs = [0] * first
        self.fps = [0] * first
        self.fp_counts: dict[int, int] = {}  # fingerprint -> rows holding it
        self.keys = [0] * first
        self.sets: list[frozenset[int] | None] = [None] * first  # exact word sets (None: too long, estimate only)
        self.content = 0
        self.size = 0
        self.pos = 0
        self.top = 0  # the most words of a row ever added (what the twin table must cover)
        self._index: np.ndarray | None = None  # ``vocabs`` as an index array (None: a row changed since)

    @property
    def mh(self) -> np.ndarray:
        """The signatures block (one uint8 row per slot): the rows added since the last read are written now, so a
        ring that no comparison reads (a repeated prompt) costs no numpy store per request."""
        block, pending = self._mh, self._pending
        if pending:
            if len(block) != len(self.rows) or len(pending) > 8:
                block = self._mh = np.array([r if r is not None else _NO_ROW for r in self.rows], dtype=np.uint8)
            else:
                rows = self.rows
                for slot in pending:
                    row = rows[slot]
                    block[slot] = row if row is not None else _NO_ROW
            pending.clear()
        return block

    @property
    def vocab(self) -> np.ndarray:
        """Each row's word count (float32, one per slot)."""
        return np.array(self.vocabs, dtype=np.float32)

    def _vocab_index(self) -> np.ndarray:
        v = self._index
        if v is None:
            v = self._index = np.array(self.vocabs, dtype=np.intp)[:, None]  # a column: rows of the table
        return v

    @property
    def fp(self) -> np.ndarray:
        """Each row's prompt fingerprint (uint64, one per slot)."""
        return np.array(self.fps, dtype=np.uint64)

    def add(self, mh: np.ndarray, vocab: int, fp: int, key: int = 0,
            word_set: frozenset[int] | None = None) -> None:
        """Add a row: ``mh`` a MinHash signature (uint8 or wider), ``key`` its ``Sketch.row_key``."""
        size, pos = self.size, self.pos
        slots = len(self.vocabs)
        if size == slots and size < self.cap:
            grow = min(self.cap, 2 * slots)
            extra = grow - slots
            self.rows += [None] * extra
            self._pending.append(-1)  # the block is rebuilt at its next read
            self.vocabs += [0] * extra
            self.fps += [0] * extra
            self.keys += [0] * extra
            self.sets += [None] * extra
            pos = size
            slots = grow
        counts = self.fp_counts
        if size == slots:  # full: the oldest row leaves
            self.content = (self.content - self.keys[pos]) & _MASK64
            old = self.fps[pos]
            left = counts[old] - 1
            if left:
                counts[old] = left
            else:
                del counts[old]
        else:
            size += 1
        # a wider signature is cast as astype(np.uint8) casts it (its low byte)
        self.rows[pos] = mh if mh.dtype == np.uint8 else mh.astype(np.uint8)
        if len(self._pending) <= 8:  # beyond, the next read rebuilds the block whatever the slots
            self._pending.append(pos)
        self.vocabs[pos] = vocab
        if vocab > self.top:
            self.top = vocab
        self.fps[pos] = fp
        counts[fp] = counts.get(fp, 0) + 1
        self.keys[pos] = key
        self.sets[pos] = word_set
        self._index = None
        self.content = (self.content + key) & _MASK64
        self.pos = pos + 1 if pos + 1 < slots else 0
        self.size = size

    def has_twin(self, s: Sketch, fp: int) -> bool:
        """Whether a row is a near-twin of ``s``: at most TWIN_MAX_WORDS words apart, yet not the same prompt. The
        MinHash estimate only picks candidates; the decision is the exact word difference when both rows keep their
        word sets (a long shared template made the estimate call 63% of distinct banking77 messages twins).

        The estimate of a row's word difference is a function of the row's word count, the prompt's and the
        number of equal signature values: ``_twin_codes`` tabulates it once per prompt word count, so a comparison
        is one equality count and one table lookup (``has_twin_full`` computes it directly: the same answer)."""
        size = self.size
        if self.fp_counts.get(fp, 0) >= size:
            return False  # every row is this very prompt (a resampling run): no twin, nothing to estimate
        table = _twin_codes(s.vocab_size, self.top)
        if table is None:  # a very long prompt in the ring: computed directly
            return self.has_twin_full(s, fp)
        full = size == len(self.vocabs)
        block = self.mh
        same = _equal_counts((block if full else block[:size]) == s.minhash8)  # (size, 1)
        codes = table[self._vocab_index() if full else self._vocab_index()[:size], same]  # (size, 1)
        fps, sets, word_set = self.fps, self.sets, s.word_set
        if word_set is None:
            return any(fps[i] != fp for i in np.flatnonzero(codes == 2).tolist())
        for i in np.flatnonzero(codes).tolist():
            if fps[i] == fp:
                continue
            row = sets[i]
            if row is None:
                if codes[i, 0] == 2:
                    return True
            elif len(row ^ word_set) <= TWIN_MAX_WORDS:
                return True
        return False

    def has_twin_full(self, s: Sketch, fp: int) -> bool:
        """``has_twin`` computed without its table (what the tests compare it with)."""
        if not self.size:
            return False
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


def _equal_counts(eq: np.ndarray) -> np.ndarray:
    """The True values of each row of a (rows, MINHASH_PERMS) bool array, as a column: the bits packed and counted
    (fewer instructions than numpy's sum along the short axis)."""
    return np.bitwise_count(np.packbits(eq, axis=1).view(np.uint64))  # type: ignore[no-any-return]


if not hasattr(np, "bitwise_count"):  # numpy < 2.0
    def _equal_counts(eq: np.ndarray) -> np.ndarray:
        return eq.sum(axis=1)[:, None]  # type: ignore[no-any-return]


_TWIN_CODES: dict[int, np.ndarray] = {}
_TWIN_BYTES = 8 << 20  # the tables kept, all together (one is 65 bytes per row word count, for a prompt word count)
_TWIN_TOP = 4096  # rings holding a prompt of more words compare directly (the table would be too large)


def _twin_codes(b: int, top: int) -> np.ndarray | None:
    """For a prompt of ``b`` words: code[a, k] for a row of ``a`` words (``a`` up to at least ``top``) with ``k`` equal
    signature values of MINHASH_PERMS: 2 when the estimated word difference is at most TWIN_MAX_WORDS, 1 when
    within TWIN_MAX_WORDS + TWIN_CANDIDATE_SLACK, else 0. The estimate is computed exactly as ``has_twin_full``
    computes it (float32, the same operations in the same order), so the codes give its answers bit for bit. None
    when ``top`` is ``_TWIN_TOP`` or more."""
    known = _TWIN_CODES.get(b)
    if known is not None and len(known) > top:
        return known
    if top >= _TWIN_TOP:
        return None
    rows = 64
    while rows <= top:
        rows *= 2
    j = np.arange(MINHASH_PERMS + 1, dtype=np.int32)[None, :].astype(np.float32) * np.float32(1.0 / MINHASH_PERMS)
    a = np.arange(rows, dtype=np.float32)[:, None]
    bf = float(b)
    inter = j * (a + bf) / (1.0 + j)
    delta = a + bf - 2.0 * inter
    table: np.ndarray = ((delta <= TWIN_MAX_WORDS).astype(np.int8) + (delta <= TWIN_MAX_WORDS + TWIN_CANDIDATE_SLACK)).astype(np.int8)
    if sum(t.nbytes for t in _TWIN_CODES.values()) + table.nbytes > _TWIN_BYTES:
        _TWIN_CODES.clear()
    _TWIN_CODES[b] = table
    return table


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
