"""MinHash: distillgate.minhash against rensa and datasketch on the same data (banking77 train, 10,003 texts).

Two uses, timed in CPU microseconds per text (median of 5 runs; the machine is shared):

- batch (the dataset builder): signatures of word-bigram shingle sets already hashed to 64 bits (the same flat
  hashes for every contender), ending in a numpy (N, 64) uint32 matrix, which LSH banding needs;
- one text (the extraction monitor, per request): a 64-value signature of the prompt's word set, from the text.

The libraries are imported here only; they are not dependencies of distillgate. Install them to run this
(``pip install rensa==0.5.0 datasketch==2.0.0``). Writes benchmarks/results/minhash_libraries.json.
"""

from __future__ import annotations

import csv
import itertools
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from distillgate import minhash  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "minhash_libraries.json"
NUM_PERM = 64


def _time(fn: Callable[[], object], n: int, repeats: int = 5) -> float:
    runs = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        runs.append((time.process_time() - t) * 1e6 / n)
    return round(statistics.median(runs), 2)


def main() -> None:
    import datasketch
    import rensa
    import xxhash

    with (ROOT / "data" / "banking77" / "train.csv").open(newline="") as fh:
        texts = [r["text"] for r in csv.DictReader(fh)]
    perms = minhash.Permutations.make(NUM_PERM, 42)
    chunks = [minhash.chunk_shingles(texts[s : s + 4096], 2) for s in range(0, len(texts), 4096)]

    def ours_batch() -> None:
        for _, counts, flat in chunks:
            minhash.signatures(flat, counts, perms)

    def rensa_batch() -> None:
        for _, counts, flat in chunks:
            offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.uint64)
            matrix = rensa.RMinHash.digest_matrix_from_flat_token_hashes(flat, offsets, NUM_PERM, 42)
            np.array(matrix.to_rows(), dtype=np.uint32)  # no buffer export: rows come back as Python lists

    def rensa_batch_no_copy() -> None:
        for _, counts, flat in chunks:
            offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.uint64)
            rensa.RMinHash.digest_matrix_from_flat_token_hashes(flat, offsets, NUM_PERM, 42)

    datasketch_sample = texts[:2000]
    sample_chunks = minhash.chunk_shingles(datasketch_sample, 2)
    sample_offsets = np.concatenate(([0], np.cumsum(sample_chunks[1])))
    sample_sets = [sample_chunks[2][a:b] for a, b in itertools.pairwise(sample_offsets)]

    def datasketch_batch() -> None:
        out = np.empty((len(sample_sets), NUM_PERM), dtype=np.uint32)
        for k, hashes in enumerate(sample_sets):
            m = datasketch.MinHash(num_perm=NUM_PERM, seed=42, hashfunc=int)
            m.update_batch((hashes & np.uint64(0xFFFFFFFF)).tolist())  # its default scheme takes 32-bit hashes
            out[k] = m.hashvalues

    words = [minhash_words(t) for t in texts]

    def ours_one() -> None:
        for w in words:
            hashes = np.fromiter((xxhash.xxh64_intdigest(x.encode()) for x in w), dtype=np.uint64, count=len(w))
            minhash.signature(hashes, perms)

    def rensa_one() -> None:
        for w in words:
            m = rensa.RMinHash(num_perm=NUM_PERM, seed=42)
            m.update(w)
            np.array(m.digest(), dtype=np.uint32)

    def datasketch_one() -> None:
        for w in words[:2000]:
            m = datasketch.MinHash(num_perm=NUM_PERM, seed=42)
            m.update_batch([x.encode() for x in w])

    results = {
        "batch_us_per_text": {
            "distillgate.minhash": _time(ours_batch, len(texts)),
            "rensa digest_matrix_from_flat_token_hashes + to numpy": _time(rensa_batch, len(texts)),
            "rensa digest_matrix_from_flat_token_hashes (matrix left in rensa)": _time(rensa_batch_no_copy,
                                                                                       len(texts)),
            "datasketch MinHash.update_batch (2,000 texts)": _time(datasketch_batch, len(sample_sets), 3),
        },
        "one_text_us_per_text": {
            "distillgate.minhash (xxhash words + signature)": _time(ours_one, len(texts)),
            "rensa RMinHash.update + digest": _time(rensa_one, len(texts)),
            "datasketch MinHash.update_batch (2,000 texts)": _time(datasketch_one, 2000, 3),
        },
        "versions": {"rensa": getattr(rensa, "__version__", "0.5.0"), "datasketch": datasketch.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
    }
    for use, figures in results.items():
        if use != "versions":
            print(use)
            for name, value in figures.items():  # type: ignore[attr-defined]
                print(f"  {value:>8} us  {name}")
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


def minhash_words(text: str) -> list[str]:
    import re

    return sorted(set(re.findall(r"[a-z0-9']+", text.lower()))) or [""]


if __name__ == "__main__":
    main()
