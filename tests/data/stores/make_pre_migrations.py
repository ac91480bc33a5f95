"""Make tests/data/stores/pre-migrations.db with distillgate as of 8bd5921 (before recorded migrations)."""
import json
import sys
import time
from pathlib import Path

from distillgate.keys import KeyStore
from distillgate.ledger.store import Store
from distillgate.policy import Request, policy_from_data

out = Path(sys.argv[1])
seed = json.loads(Path(sys.argv[2]).read_text())
policy = policy_from_data(seed)
with Store.open(out / "pre-migrations.db", checkpoint_every=4, reservation_ttl_s=0.0) as store:
    def req(run):
        return Request(user="alice", project="internal-compression", run=run, output_type="labels", model="m",
                       max_tokens=5, prompt_tokens=2)
    a = store.admit(policy, req("old-run"))
    store.settle(a.reservation_id, prompt_tokens=2, completion_tokens=3)
    b = store.admit(policy, req("old-run"))
    store.settle(b.reservation_id, outcome="upstream_error")
    c = store.admit(policy, req("other-run"))
    time.sleep(0.01)
    store.reclaim_expired()
    store.append_event("note", {"what": "written by distillgate before recorded migrations"})
    store.checkpoint()
ks = KeyStore(out / "pre-migrations.db")
rec, secret = ks.create("alice", label="fixture")
ks.close()
(out / "pre-migrations.key.txt").write_text(secret + "\n")
