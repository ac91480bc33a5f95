"""The gateway's collector setting at startup: young collections every GC_YOUNG_THRESHOLD allocations, never lower
than an operator's own setting, and cycles still collected."""

from __future__ import annotations

import gc

from distillgate.gateway import app


def test_startup_raises_the_young_threshold_and_keeps_collecting_cycles() -> None:
    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        app._tune_gc()
        assert gc.get_threshold() == (app.GC_YOUNG_THRESHOLD, 10, 10)
        gc.set_threshold(50_000, 10, 10)  # an operator's higher setting stays
        app._tune_gc()
        assert gc.get_threshold()[0] == 50_000

        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a  # type: ignore[attr-defined]
        import weakref
        ref = weakref.ref(a)
        del a, b
        gc.collect()
        assert ref() is None
    finally:
        gc.set_threshold(*before)
