"""docs/reliability.md cannot drift: every test it cites as proof exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "reliability.md").read_text()


def test_every_cited_test_exists() -> None:
    cited = re.findall(r"`tests/((?:adversarial/)?test_\w+\.py)::(test_\w+)`", DOC)
    assert len(cited) >= 20
    missing = [f"{f}::{t}" for f, t in cited
               if not (ROOT / "tests" / f).exists()
               or not re.search(rf"^def {t}\(", (ROOT / "tests" / f).read_text(), re.M)]
    assert not missing, f"docs/reliability.md cites tests that do not exist: {missing}"


def test_every_reliability_test_is_cited() -> None:
    for path in sorted([*(ROOT / "tests").glob("test_reliability_*.py"),
                        *(ROOT / "tests" / "adversarial").glob("test_adv_*.py")]):  # the gateway's attacks
        if path.name == "test_reliability_docs.py":
            continue
        for name in re.findall(r"^def (test_\w+)\(", path.read_text(), re.M):
            rel = path.relative_to(ROOT).as_posix()
            assert f"`{rel}::{name}`" in DOC, f"cite {rel}::{name} in docs/reliability.md"
