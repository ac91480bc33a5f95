"""Attacks on the decision log over real HTTP, against one `gateway serve` and the fake teacher.

* the policy's `audit.checkpoint_every` is what the gateway keeps;
* nothing unauthenticated grows the log by more than a small constant, whatever it sends;
* a run belongs to one project: another project reusing its id is refused (RUN_OWNED_BY_OTHER_PROJECT), also when
  both race for a new id, and the run's export and quotas stay the owner's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from _log_support import LOOSE, STRICT, Served, bodies, rows, served

from distillgate.ledger.entries import DENIAL_MAX_BYTES

from conftest import run_cli


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("adv-log")
    dest = (tmp / "exports").as_uri() + "/"
    policies = ({**STRICT, "allowed_destinations": [dest]}, {**LOOSE, "allowed_destinations": [dest]})
    with served(tmp, policies=policies, users=("alice", "mallory")) as s:
        yield s


def test_gateway_keeps_the_policys_checkpoint_every(gw: Served) -> None:
    for i in range(6):
        assert gw.chat(run="cp-run", content=f"checkpoint {i}").status_code == 200
    (size,) = rows(gw.db, "SELECT count(*) FROM log")[0]
    sizes = {s for (s,) in rows(gw.db, "SELECT tree_size FROM checkpoints")}
    assert size >= 12 and set(range(5, size + 1, 5)) <= sizes  # STRICT says audit.checkpoint_every: 5


def _entry_sizes(db: Path, start: int) -> list[int]:
    return [len(body) for (body,) in rows(db, "SELECT body FROM log WHERE idx >= ? ORDER BY idx", (start,))]


def test_unauthenticated_requests_grow_the_log_by_a_small_constant(gw: Served) -> None:
    (start,) = rows(gw.db, "SELECT count(*) FROM log")[0]
    big = "x" * 200_000
    body = {"model": "m" * 200_000, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}],
            "metadata": {"policy_user": big, "policy_project_id": "p" + big, "policy_run_id": "r" + big,
                         "policy_output_type": "o" + big}}
    for auth in (None, "Bearer not-a-key"):  # no key, a wrong key
        headers = {"Authorization": auth} if auth else {}
        res = httpx.post(gw.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert res.status_code == 401
    res = gw.chat(user="u" * 2000, project="p" * 2000, run="r" * 2000, key="")  # identity in headers (under any header bound)
    assert res.status_code == 401
    sizes = _entry_sizes(gw.db, start)
    assert len(sizes) == 3 and max(sizes) < DENIAL_MAX_BYTES, sizes
    entry = bodies(gw.db)[start]
    assert entry["decision"] == "deny" and "AUTH_MISSING" in entry["reasons"]
    assert "sha256" in entry["project"] and len(entry["project"]) < 200  # bounded, still tells long values apart


def test_an_authenticated_denial_stores_bounded_identity(gw: Served) -> None:
    (start,) = rows(gw.db, "SELECT count(*) FROM log")[0]
    res = gw.chat(project="p" * 2000, run="r" * 2000)
    assert res.status_code == 403
    assert _entry_sizes(gw.db, start)[0] < DENIAL_MAX_BYTES


def test_a_run_id_of_another_project_is_refused(gw: Served) -> None:
    assert gw.chat(run="owned", content="strict work").status_code == 200
    res = gw.chat(user="mallory", project="loose", run="owned", content="outnumber it")
    assert res.status_code == 409, res.text
    assert res.json()["error"]["reasons"] == ["RUN_OWNED_BY_OTHER_PROJECT"]
    assert "belongs to project 'strict'" in res.json()["error"]["message"]
    # the run's export is the owner's: judged by its policy, holding its entries only
    out = gw.db.parent / "exports" / "owned"
    res_export = run_cli("audit", "export", "--db", str(gw.db), "--run", "owned", "--to", out.as_uri() + "/",
                         "--policy", str(gw.policy_dir))
    assert res_export.returncode == 0, res_export.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["project"] == "strict" and manifest["projects"] == ["strict"]
    assert manifest["policies"] == [p for p in manifest["policies"] if p.startswith("strict@")]
    lines = [json.loads(x) for x in (out / "decisions.jsonl").read_text().splitlines()]
    assert {x.get("project") for x in lines} == {"strict"}
    # asking for the run as the other project is refused, and says whose it is
    other = run_cli("audit", "export", "--db", str(gw.db), "--run", "owned", "--project", "loose",
                    "--to", (gw.db.parent / "exports" / "stolen").as_uri() + "/", "--policy", str(gw.policy_dir))
    assert other.returncode == 2 and "belongs to project 'strict'" in other.stderr
    assert not (gw.db.parent / "exports" / "stolen").exists()


def test_two_projects_racing_for_a_new_run_id_get_one_owner(gw: Served) -> None:
    runs = [f"race-{i}" for i in range(12)]
    jobs = [(run, who) for run in runs for who in ("alice", "mallory")]

    def send(job: tuple[str, str]) -> tuple[str, str, int]:
        run, who = job
        project = "strict" if who == "alice" else "loose"
        return run, project, gw.chat(user=who, project=project, run=run).status_code

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, jobs))
    owners = dict(rows(gw.db, "SELECT run, project FROM runs WHERE run LIKE 'race-%'"))
    for run in runs:
        statuses = {project: status for r, project, status in results if r == run}
        assert sorted(statuses.values()) == [200, 409], (run, statuses)
        assert statuses[owners[run]] == 200
