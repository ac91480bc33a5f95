"""Leakage-safe splits: whole components (source group + near-duplicate cluster) go to one split.

Rows that passed the filters are joined into components: rows of one input, one source group (account, document,
conversation) or one near-duplicate cluster are in the same component, transitively. Then:

1. **golden**: once a version is frozen the golden set is hash-locked (``golden_lock``: row id -> golden hash) and
   those rows stay golden; before that, ``split.golden.ids_file`` or a ``fraction`` of components is drawn.
2. **holdout**: every component holding a hard case (rare label, very long/short input, ambiguous samples, low
   teacher confidence, adversarial tag, "cannot answer" label) is held out whole.
3. the rest go to train/val/test by ``ratios``: by a seeded hash of the component (stable as rows are added), or,
   with ``by_time``, in order of the component's earliest timestamp (oldest to train).

Rows that failed filters get split ``excluded``.

**Synthetic rows only ever train** (``distillgate.data.synthesize``; enforced here, like the golden lock): they
never key a component (real input ids rank first), never mark one as a hard case, and do not count towards rare
labels or length quantiles. A component of synthetic rows only goes to train whatever its draw; a synthetic row in
a component whose real rows went to val, test, golden or holdout (it is a near-duplicate of them) is ``excluded``
with reason ``synthetic_held_out``, and so is a synthetic row named by a golden lock.

The work is columnar (``assign_split_columns``): one small integer per row and per input, never a ``Row`` object,
so a build of millions of rows holds arrays, not objects (docs/dataset.md, "Memory"). Components are the connected
components of the graph row -- input / source group / cluster (scipy's ``connected_components``), numbered in order
of their first row, as the row-at-a-time union-find before it did.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from distillgate.data.config import HoldoutConfig, SplitConfig
from distillgate.errors import NotFoundError, UserError

I64 = npt.NDArray[np.int64]
Ints = npt.NDArray[np.signedinteger[Any]]  # int32 per row where it fits: memory is the point
BOOL = npt.NDArray[np.bool_]
SPLIT_NAMES = ("train", "val", "test", "golden", "holdout", "excluded")
HARD_REASONS = ("cannot_answer", "adversarial", "ambiguous", "low_confidence", "rare_label", "long_input",
                "short_input")  # in the order they are tried
SPLIT_REASONS: tuple[str | None, ...] = (None, "filtered", "locked", "golden_group", "ids_file", "sampled",
                                         *HARD_REASONS, *(f"with_{r}" for r in HARD_REASONS),
                                         "synthetic_held_out")
_TRAIN, _VAL, _TEST, _GOLDEN, _HOLDOUT, _EXCLUDED = range(6)
_R = {name: i for i, name in enumerate(SPLIT_REASONS)}
_HARD0 = _R["cannot_answer"]
_WITH0 = _R["with_cannot_answer"]


@dataclass
class SplitReport:
    counts: dict[str, int] = field(default_factory=dict)
    holdout_reasons: dict[str, int] = field(default_factory=dict)
    components: int = 0


def _unit(seed: int, key: str) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def golden_ids_file(path: str) -> set[str]:
    p = Path(path)
    if not p.exists():
        raise NotFoundError(f"golden ids_file {p} does not exist", hint="one input_id per line")
    return {line.strip() for line in p.read_text().splitlines() if line.strip()}


@dataclass
class SplitInputs:
    """What the split needs, one value per row (N) or per distinct input (D), from the build's first pass.

    Row-level hard-case facts that need no other row: ``pre_hard`` (0, or 1 + the index in ``HARD_REASONS`` of
    cannot_answer / adversarial), ``low_confidence``; the rest (ambiguous, rare label, long/short input) are
    decided here from ``agreement``, ``label`` and ``n_words``.
    """

    live: BOOL  # (N,) passed the filters
    input_idx: Ints  # (N,) distinct input of the row, numbered in order of first appearance
    input_rank: Ints  # (D,) rank of the input id in string order (the component key is the smallest)
    input_ids: Callable[[Ints], list[str]]  # the input id strings of some inputs
    cluster_input: Ints  # (D,) the input that names the input's near-duplicate cluster
    cluster_named: BOOL  # (D,) that name is a non-empty string
    group: Ints  # (N,) source group number, -1 when none (or empty)
    locked: BOOL  # (N,) row id in the golden lock
    ids_member: BOOL | None  # (N,) input id in split.golden.ids_file (None: no ids_file)
    label: Ints  # (N,) final label number (None is a label too)
    pre_hard: npt.NDArray[np.int8]  # (N,)
    low_confidence: BOOL  # (N,)
    agreement: npt.NDArray[np.float64]  # (D,) per input; NaN: one sample
    n_words: Ints | None  # (N,) words of the input (None: no length quantile configured)
    ts_rank: Ints | None  # (N,) rank of source_timestamp in string order, -1 for none (only with by_time)
    synthetic: BOOL | None = None  # (N,) the row is synthetic (None: no synthetic rows)


@dataclass
class SplitColumns:
    split: npt.NDArray[np.int8]  # index into SPLIT_NAMES
    reason: npt.NDArray[np.int8]  # index into SPLIT_REASONS
    report: SplitReport


def _component_of_live(x: SplitInputs, live_rows: Ints) -> tuple[Ints, int]:
    """Component number of every live row, numbered in order of each component's first row.

    Nodes are inputs, source groups and clusters (a row is in its input's component): an edge joins an input to
    the group of each of its live rows, and an input with a live row to its cluster.
    """
    n_inputs = len(x.input_rank)
    inp = x.input_idx[live_rows]
    n_groups = int(x.group.max()) + 1 if len(x.group) else 0
    grp = x.group[live_rows]
    has_group = grp >= 0
    has_live = np.zeros(n_inputs, dtype=bool)
    has_live[inp] = True
    named = np.flatnonzero(has_live & x.cluster_named)
    src = np.concatenate((inp[has_group], named)).astype(np.int32)
    dst = np.concatenate((n_inputs + grp[has_group], n_inputs + n_groups + x.cluster_input[named])).astype(np.int32)
    del grp, has_group, has_live, named
    n_nodes = 2 * n_inputs + n_groups
    graph = coo_matrix((np.ones(len(src), dtype=bool), (src, dst)), shape=(n_nodes, n_nodes)).tocsr()
    del src, dst
    _, node_labels = connected_components(graph, directed=False)
    del graph
    labels = node_labels[inp].astype(np.int32)
    del node_labels, inp
    uniq, first = np.unique(labels, return_index=True)
    renumber = np.empty(int(uniq.max()) + 1 if len(uniq) else 0, dtype=np.int32)
    renumber[uniq[np.argsort(first, kind="stable")]] = np.arange(len(uniq), dtype=np.int32)
    return renumber[labels], len(uniq)


def _any_per(comp: Ints, flag: BOOL, n: int) -> BOOL:
    return np.bincount(comp[flag], minlength=n) > 0


def _hard_codes(x: SplitInputs, h: HoldoutConfig, live_rows: Ints, real: BOOL) -> npt.NDArray[np.int8]:
    """The first hard-case reason of each live row (``_R`` code, 0 for none), tried in ``HARD_REASONS`` order.

    Only ``real`` rows are marked, and label counts and length quantiles are those of the real rows.
    """
    label = x.label[live_rows]
    counts = np.bincount(label[real], minlength=int(label.max()) + 1 if len(label) else 0)
    out = np.zeros(len(live_rows), dtype=np.int8)
    undecided = real.copy()

    def take(flag: BOOL, name: str) -> None:
        hit = undecided & flag
        out[hit] = _R[name]
        undecided[hit] = False

    pre = x.pre_hard[live_rows]
    take(pre == 1, "cannot_answer")
    take(pre == 2, "adversarial")
    agreement = x.agreement[x.input_idx[live_rows]]
    take(~np.isnan(agreement) & (agreement < h.ambiguous_max_agreement), "ambiguous")
    take(x.low_confidence[live_rows], "low_confidence")
    take(counts[label] <= h.rare_label_max_count, "rare_label")
    if x.n_words is not None:
        lengths = x.n_words[live_rows]
        if h.long_input_quantile is not None:
            take(lengths > _quantile_array(lengths[real], h.long_input_quantile), "long_input")
        if h.short_input_quantile is not None:
            take(lengths < _quantile_array(lengths[real], h.short_input_quantile), "short_input")
    return out


def _quantile_array(values: Ints, q: float) -> float:
    if not len(values):
        return 0.0
    pos = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return float(np.partition(values, pos)[pos])


def _units(seed: int, prefix: str, keys: Callable[[Ints], list[str]], inputs: Ints) -> npt.NDArray[np.float64]:
    out = np.empty(len(inputs))
    step = 65536
    for start in range(0, len(inputs), step):
        names = keys(inputs[start : start + step])
        out[start : start + len(names)] = [_unit(seed, prefix + key) for key in names]
    return out


def _pick_codes(names: list[str], ratios: Mapping[str, float], u: npt.NDArray[np.float64]) -> npt.NDArray[np.int8]:
    """``_pick`` for many values at once: the first name whose running ratio sum exceeds u, else the last."""
    codes = np.full(len(u), SPLIT_NAMES.index(names[-1]), dtype=np.int8)
    undecided = np.ones(len(u), dtype=bool)
    acc = 0.0
    for name in names:
        acc += ratios[name]
        hit = undecided & (u < acc)
        codes[hit] = SPLIT_NAMES.index(name)
        undecided[hit] = False
    return codes


def assign_split_columns(x: SplitInputs, cfg: SplitConfig, golden_locked: bool) -> SplitColumns:
    """Split and split-reason codes for every row; only live rows are split (the others are excluded/filtered).

    ``golden_locked``: a golden lock exists (then ids_file and fraction are not used).
    """
    n = len(x.live)
    split = np.full(n, _EXCLUDED, dtype=np.int8)
    reason = np.full(n, _R["filtered"], dtype=np.int8)
    report = SplitReport()
    live_rows = np.flatnonzero(x.live).astype(np.int32)
    syn = x.synthetic[live_rows] if x.synthetic is not None else np.zeros(len(live_rows), dtype=bool)
    input_rank = x.input_rank
    if syn.any():  # real input ids rank before synthetic ones: a synthetic row never keys a real component
        assert x.synthetic is not None
        syn_input = np.zeros(len(input_rank), dtype=bool)
        syn_input[x.input_idx[x.synthetic]] = True
        shifted = input_rank.astype(np.int64) + len(input_rank) * syn_input
        input_rank = np.empty(len(shifted), dtype=np.int32)
        input_rank[np.argsort(shifted, kind="stable")] = np.arange(len(shifted), dtype=np.int32)
    comp, n_comps = _component_of_live(x, live_rows)
    report.components = n_comps
    key_rank = np.full(n_comps, np.iinfo(np.int32).max, dtype=np.int32)
    np.minimum.at(key_rank, comp, input_rank[x.input_idx[live_rows]])
    key_input = np.argsort(input_rank)[key_rank]  # the input whose id is the component's key
    sizes = np.bincount(comp, minlength=n_comps)
    live_split = np.full(len(live_rows), -1, dtype=np.int8)
    live_reason = np.zeros(len(live_rows), dtype=np.int8)
    done = np.zeros(n_comps, dtype=bool)

    if golden_locked:
        hit = _any_per(comp, x.locked[live_rows], n_comps)
        rows_in = hit[comp]
        own = x.locked[live_rows]
        live_split[rows_in] = np.where(own[rows_in], _GOLDEN, _EXCLUDED)
        live_reason[rows_in] = np.where(own[rows_in], _R["locked"], _R["golden_group"])
        done |= hit
    elif x.ids_member is not None:
        hit = _any_per(comp, x.ids_member[live_rows], n_comps)
        live_split[hit[comp]], live_reason[hit[comp]] = _GOLDEN, _R["ids_file"]
        done |= hit
    elif cfg.golden.fraction > 0:  # _unit is never below 0: a zero fraction samples nothing
        hit = np.zeros(n_comps, dtype=bool)
        hit[~done] = _units(cfg.seed, "golden:", x.input_ids, key_input[~done]) < cfg.golden.fraction
        live_split[hit[comp]], live_reason[hit[comp]] = _GOLDEN, _R["sampled"]
        done |= hit

    h = cfg.holdout
    if h.enabled:
        codes = _hard_codes(x, h, live_rows, ~syn)
        codes[done[comp]] = 0
        marked = np.flatnonzero(codes)
        first_row = np.full(n_comps, len(live_rows), dtype=np.int32)
        np.minimum.at(first_row, comp[marked], marked)
        hit = first_row < len(live_rows)
        rows_in = hit[comp]
        first_code = codes[np.minimum(first_row, len(live_rows) - 1)][comp]
        live_split[rows_in] = _HOLDOUT
        live_reason[rows_in] = np.where(codes[rows_in] > 0, codes[rows_in],
                                        first_code[rows_in] - _HARD0 + _WITH0).astype(np.int8)
        # counted in component order, members in row order (the order the reasons first appear)
        held = np.flatnonzero(rows_in)
        ordered = live_reason[held[np.lexsort((held, comp[held]))]]
        values, first, counts = np.unique(ordered, return_index=True, return_counts=True)
        for k in np.argsort(first, kind="stable").tolist():
            report.holdout_reasons[str(SPLIT_REASONS[int(values[k])])] = int(counts[k])
        done |= hit

    names: list[str] = [s for s in ("train", "val", "test") if s in cfg.ratios]
    rest = np.flatnonzero(~done)
    if cfg.by_time:
        assert x.ts_rank is not None
        ts = np.full(n_comps, np.iinfo(np.int32).max, dtype=np.int32)
        stamps = np.where(syn, np.iinfo(np.int32).max, x.ts_rank[live_rows]).astype(np.int32)  # synthetic: no time
        if (stamps[~done[comp]] < 0).any():
            raise UserError(
                "split.by_time is on but some rows have no timestamp",
                hint="map ingest.columns.timestamp to a column with ISO 8601 times, or set split.by_time=false",
            )
        np.minimum.at(ts, comp, stamps)
        rest = rest[np.lexsort((key_rank[rest], ts[rest]))]
        total = int(sizes[rest].sum()) or 1
        before = np.concatenate(([0], np.cumsum(sizes[rest])[:-1]))
        comp_split = np.zeros(n_comps, dtype=np.int8)
        comp_split[rest] = _pick_codes(names, cfg.ratios, before / total)
    else:
        comp_split = np.zeros(n_comps, dtype=np.int8)
        comp_split[rest] = _pick_codes(names, cfg.ratios, _units(cfg.seed, "", x.input_ids, key_input[rest]))
    in_rest = ~done[comp]
    live_split[in_rest] = comp_split[comp[in_rest]]
    live_reason[in_rest] = 0
    if syn.any():
        pure = ~_any_per(comp, ~syn, n_comps)[comp]  # the row's component holds no real row
        off_train = syn & (live_split != _TRAIN)
        to_train = off_train & pure & ~x.locked[live_rows]
        live_split[to_train], live_reason[to_train] = _TRAIN, 0
        held = off_train & ~to_train
        live_split[held], live_reason[held] = _EXCLUDED, _R["synthetic_held_out"]
    split[live_rows], reason[live_rows] = live_split, live_reason
    values, first, counts = np.unique(split, return_index=True, return_counts=True)
    report.counts = {SPLIT_NAMES[int(values[k])]: int(counts[k]) for k in np.argsort(first, kind="stable").tolist()}
    return SplitColumns(split, reason, report)
