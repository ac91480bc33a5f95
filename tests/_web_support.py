"""Helpers for the review-site tests: a small dataset with hostile teacher outputs (and one structured task whose
answers must match a JSON schema), a policy, keys, a password account, a live server."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from _data_support import make_dataset, sample, teacher_answer
from distillgate.data.pipeline import build
from distillgate.data.store import WorkingCopy
from distillgate.keys import KeyStore
from distillgate.ledger.store import Store
from distillgate.policy.model import PolicySet, policy_from_data
from distillgate.web import ReviewSite, create_app
from distillgate.web.accounts import AccountStore

LABELS = ["card_arrival", "top_up_failed", "exchange_rate", "lost_or_stolen_card", "request_refund",
          "card_payment_not_recognised", "refusal"]
XSS_OUTPUT = ('{"type": "card_arrival", "explanation": "<script>window.__pwned = 1</script>'
              '<img src=x onerror=\\"window.__pwned = 2\\"> <a href=\\"javascript:window.__pwned=3\\">click</a>"}')

# the "extract" task answers with a category, an amount and a currency, checked against this schema
EXTRACT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["category", "amount", "currency"],
    "properties": {
        "category": {"enum": LABELS},
        "amount": {"type": "number", "minimum": 0},
        "currency": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "explanation": {"type": "string"},
    },
    "additionalProperties": False,
}
# a structured answer that fails the schema (amount in words) and tries to break out of the JSON editor
HOSTILE_EXPLANATION = "</textarea><script>window.__pwned = 4</script> charged twice"
EXTRACT_ANSWER = json.dumps({"type": "request_refund", "amount": "twenty", "currency": "EUR",
                             "explanation": HOSTILE_EXPLANATION})
STRUCTURED_ROW = "ds-traffic-7:0"

RECORDS = [
    {"id": str(i), "text": t, "answer": a, "task": ""}
    for i, (t, a) in enumerate([
        ("Where is my new card? <b>bold</b>", XSS_OUTPUT),
        ("My top up did not go through", teacher_answer("top_up_failed")),
        ("What exchange rate do you use?", teacher_answer("exchange_rate")),
        ("I think someone stole my card", teacher_answer("lost_or_stolen_card")),
        ("Can I get a refund for this purchase?", teacher_answer("request_refund")),
        ("The app shows a payment I did not make", teacher_answer("card_payment_not_recognised")),
        ("I think someone stole my card yesterday", teacher_answer("lost_or_stolen_card")),  # near-dup of 3
    ])
]
RECORDS.append({"id": "7", "text": "I was charged 20 euros twice for one coffee", "answer": EXTRACT_ANSWER,
                "task": "extract"})
# second teacher samples: three disagree with the first, so the disagreement queue has three inputs (6 rows)
SECOND = {"0": "top_up_failed", "1": "top_up_failed", "2": "card_arrival", "3": "card_arrival",
          "4": "request_refund", "5": "request_refund"}

POLICY: dict[str, Any] = {
    "policy_id": "review-test",
    "allowed_projects": ["bank", "other"],
    "allowed_outputs": ["labels"],
    "review": {"reviewers": {"bank": ["alice", "bob"], "other": ["mallory"]}},
}


PASSWORDS = {"alice": "alice-reviews-bank-7"}


def make_review_dataset(tmp: Path) -> Path:
    """A built working copy: 6 inputs x 2 teacher samples, allowed labels set, one output full of markup; and one
    row of the structured task ``extract`` whose answer fails its JSON schema (``STRUCTURED_ROW``)."""
    columns = {"input": "text", "record_id": "id", "output": "answer", "group": "group", "timestamp": "ts",
               "tags": "tags", "task": "task"}
    wc = make_dataset(tmp, RECORDS, {
        "name": "bank-intents", "ingest": {"columns": columns}, "filters": {"allowed_labels": LABELS},
        "tasks": {"extract": {"filters": {"json_schema": EXTRACT_SCHEMA, "allowed_labels": LABELS}}}})
    try:
        samples = [sample(f"ds-traffic-{i}", 1, teacher_answer(label),
                          label_probs={label: 0.45, "card_arrival": 0.30, "refusal": 0.25})
                   for i, label in SECOND.items()]
        wc.append_generated(samples)
        build(wc)
    finally:
        wc.close()
    return tmp / "ds"


def make_site(tmp: Path, **kwargs: Any) -> tuple[ReviewSite, dict[str, str]]:
    dataset = make_review_dataset(tmp)
    db = tmp / "review.db"
    keys = KeyStore(db)
    secrets = {user: keys.create(user)[1] for user in ("alice", "bob", "mallory")}
    keys.close()
    accounts = AccountStore(db)
    for user, password in PASSWORDS.items():
        accounts.add(user, password)
    accounts.close()
    policies = PolicySet([policy_from_data(POLICY)])
    site = ReviewSite(dataset=dataset, db=db, policies=policies, project="bank", run="run-7", **kwargs)
    return site, secrets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class LiveSite:
    url: str
    site: ReviewSite
    keys: dict[str, str]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, follow_redirects=False, timeout=10)

    def sign_in(self, user: str) -> httpx.Client:
        client = self.client()
        token = csrf_of(client.get("/login").text)
        reply = client.post("/login", data={"csrf": token, "api_key": self.keys[user]})
        assert reply.status_code == 303, reply.text
        return client

    def try_password(self, client: httpx.Client, user: str, password: str) -> httpx.Response:
        token = csrf_of(client.get("/login").text)
        return client.post("/login", data={"csrf": token, "user": user, "password": password})

    def dataset(self) -> WorkingCopy:
        return WorkingCopy.open(self.site.dataset)

    def events(self, kind: str = "review") -> list[dict[str, Any]]:
        with Store.open(self.site.db) as store:
            return [e.body for e in store.entries(kind=kind)]


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "no CSRF token in the page"
    return found.group(1)


def version_of(html: str) -> int:
    found = re.search(r'name="row_version" value="(\d+)"', html)
    assert found, "no row version in the page"
    return int(found.group(1))


@contextlib.contextmanager
def live_site(tmp: Path, **kwargs: Any) -> Iterator[LiveSite]:
    site, keys = make_site(tmp, **kwargs)
    with serve_site(site, keys) as live:
        yield live


@contextlib.contextmanager
def serve_site(site: ReviewSite, keys: dict[str, str]) -> Iterator[LiveSite]:
    """Serve ``site`` on a free loopback port with uvicorn in a thread (``keys``: user -> API key secret)."""
    port = free_port()
    config = uvicorn.Config(create_app(site), host="127.0.0.1", port=port, lifespan="on", access_log=False,
                            log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("review site did not start")
        time.sleep(0.01)
    try:
        yield LiveSite(f"http://127.0.0.1:{port}", site, keys)
    finally:
        server.should_exit = True
        thread.join(20)


class FakeClock:
    """A settable clock for session and lease expiry."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

