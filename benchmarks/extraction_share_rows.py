"""What sharing the content signals costs (extraction/shared.py): bytes per shared row and instructions per row.

    python benchmarks/extraction_share_rows.py              # bytes per row, and instructions under callgrind
    python benchmarks/extraction_share_rows.py --no-callgrind

Rows: banking77 messages from 20 users in one project with a 1,000-piece reference, at the hashing embedder's 256
dimensions and at MiniLM's 384 (seeded random unit vectors of that size: the cost depends on the size, not the
model). Instructions are counted by callgrind (``--dump-before=getppid``: the script calls ``os.getppid()`` between
its parts, so each part is its own dump), not timed: a figure that does not move with the machine's load.

Parts, per row: ``publish`` is what the publisher adds per embedded request (its int8 codes and the vectors back
from them, the record and its JSON); ``absorb`` what another process does with the row (decode it, compare its
pieces with the reference, apply them to the scopes, the project's MMD every 50 pieces); ``sketch`` is the
structural row every process absorbed already (its decode and ``absorb``), for scale.
Writes benchmarks/results/extraction_share_rows.json.
"""

from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
ROWS = 400


def texts() -> list[str]:
    with open(ROOT / "data" / "banking77" / "train.csv", newline="", encoding="utf-8") as fh:
        return [row["text"] for row in csv.DictReader(fh)]


class Seeded:
    """Unit vectors of ``dim`` seeded by the text (MiniLM's size without the model)."""

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def embed(self, batch: list[str]) -> np.ndarray:
        import xxhash

        out = np.stack([np.random.default_rng(xxhash.xxh64_intdigest(t.encode())).standard_normal(self.dim)
                        for t in batch]).astype(np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)  # type: ignore[no-any-return]


def measure(dim: int, rows: int) -> dict[str, int]:
    """Runs the parts, a ``getppid`` marker between each; returns the bytes of one row of each kind."""
    from distillgate.extraction import ExtractionMonitor, HashingEmbedder, RequestFeatures
    from distillgate.extraction.features import Embedded, from_codes, int8_codes
    from distillgate.extraction.shared import SharedWindows

    bank = texts()
    embedder = HashingEmbedder() if dim == 256 else Seeded(dim)
    reference = embedder.embed(bank[5000:6000])
    publisher = ExtractionMonitor(embedder=embedder, background=False)
    publisher.set_reference("p", vectors=reference)
    publisher.shared = SharedWindows(publisher, ":memory:", start=False)
    for i, t in enumerate(bank[:rows]):
        publisher.observe(RequestFeatures(ts=float(i), user=f"u{i % 20}", key_id=f"k{i % 20}", project="p",
                                          run=f"r{i % 20}", model="m", output_type="labels", prompt=t, max_tokens=8))
    queued = [item for _, item in publisher.shared._outbox]
    sketches = [orjson.dumps(s.share_record()) for s in queued if not isinstance(s, Embedded | bytes)]
    pieces = [e for e in queued if isinstance(e, Embedded)]
    embedded = [orjson.dumps(e.share_record()) for e in pieces]
    vecs = [e.vectors for e in pieces]
    absorber = ExtractionMonitor(embedder=embedder, background=False)
    ref = absorber.set_reference("p", vectors=reference)
    test = ref.mmd(200)
    assert test is not None
    test.threshold(200)  # the one-off calibration, outside the parts

    os.getppid()  # -- publish
    for e, v in zip(pieces, vecs, strict=True):
        codes = int8_codes(v)
        from_codes(codes)
        orjson.dumps(Embedded(e.user, e.key_id, e.project, e.scopes, e.keys, codes, e.boot).share_record())
    os.getppid()  # -- sketch
    from distillgate.extraction import Sketch

    for raw in sketches:
        absorber.absorb(Sketch.from_record(orjson.loads(raw)))
    os.getppid()  # -- absorb
    for raw in embedded:
        absorber.absorb_embedded(Embedded.from_record(orjson.loads(raw)))
    os.getppid()  # -- end
    return {"sketch_row_bytes": round(sum(map(len, sketches)) / max(1, len(sketches))),
            "embedded_row_bytes": round(sum(map(len, embedded)) / max(1, len(embedded)))}


def callgrind(dim: int) -> dict[str, float]:
    """Instructions per row of each part: a run of ROWS rows less a run of 0 (the setup's own instructions)."""
    per_run = []
    for rows in (0, ROWS):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "cg.out")
            subprocess.run(["valgrind", "--tool=callgrind", "--dump-before=getppid", f"--callgrind-out-file={out}",
                            sys.executable, __file__, "--child", str(dim), str(rows)], check=True,
                           capture_output=True, env={**os.environ, "PYTHONHASHSEED": "0"})
            dumps = sorted(glob.glob(out + ".*"), key=lambda p: int(p.rsplit(".", 1)[1]))
            totals = []
            for path in dumps:
                totals += [int(line.split()[1]) for line in Path(path).read_text().splitlines()
                           if line.startswith("totals:")]
            per_run.append(totals[1:4])  # after the 1st, 2nd and 3rd markers: publish, sketch, absorb
    return {part: round((per_run[1][i] - per_run[0][i]) / ROWS)
            for i, part in enumerate(("publish", "sketch", "absorb"))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", nargs=2, type=int, metavar=("DIM", "ROWS"))
    ap.add_argument("--no-callgrind", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "extraction_share_rows.json"))
    args = ap.parse_args()
    if args.child:
        measure(*args.child)
        return
    result: dict[str, object] = {}
    for dim in (256, 384):
        entry: dict[str, object] = dict(measure(dim, ROWS))
        if not args.no_callgrind:
            entry["instructions_per_row"] = callgrind(dim)
        result[f"dim_{dim}"] = entry
        print(dim, entry, flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
