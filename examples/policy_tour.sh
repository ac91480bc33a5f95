#!/usr/bin/env bash
# The policy and audit tour: validate the seed policy, make real decisions into a fresh store, verify and export
# the decision log. Needs .venv (run `make test` or `make demo` once first): bash examples/policy_tour.sh

set -euo pipefail
cd "$(dirname "$0")/.."
DG=".venv/bin/distillgate"
WORK="${DEMO_DIR:-runs/demo}"
rm -rf "$WORK" && mkdir -p "$WORK"
DB="$WORK/distillgate.db"

echo "== 1. validate the seed policy"
$DG policy validate examples/policies
echo "== 2. policy tests"
$DG policy test examples/policy-tests
echo "== 3. explain one allowed and one denied request"
cat > "$WORK/ok.json" <<'JSON'
{"policy_user": "alice", "policy_project_id": "internal-compression", "policy_run_id": "demo-run",
 "policy_output_type": "labels", "model": "local/smollm2-135m-instruct", "max_tokens": 16,
 "messages": [{"role": "user", "content": "I am still waiting on my card?"}]}
JSON
cat > "$WORK/denied.json" <<'JSON'
{"policy_user": "alice", "policy_project_id": "side-project", "policy_run_id": "demo-run",
 "policy_output_type": "third_party_model_extraction", "model": "local/smollm2-135m-instruct", "max_tokens": 16}
JSON
$DG policy explain --policy examples/policies --request "$WORK/ok.json"
$DG policy explain --policy examples/policies --request "$WORK/denied.json" || echo "(exit $? = policy denial, as expected)"
echo "== 4. record decisions for banking77 queries in a durable, hash-chained log"
.venv/bin/python - "$DB" <<'PY'
import csv, sys
from distillgate.ledger import Store
from distillgate.policy import Request, estimate_tokens, load_policies
policies = load_policies("examples/policies")
with Store.open(sys.argv[1], checkpoint_every=50) as store, open("data/banking77/test.csv") as fh:
    rows = list(csv.DictReader(fh))[:120]
    for i, row in enumerate(rows):
        project = "internal-compression" if i % 10 else "side-project"
        adm = store.admit(policies, Request(user="alice", project=project, run="demo-run", output_type="labels",
                                            model="local/smollm2-135m-instruct", max_tokens=16,
                                            prompt_tokens=estimate_tokens(row["text"])))
        if adm.reservation_id:
            store.settle(adm.reservation_id, prompt_tokens=estimate_tokens(row["text"]), completion_tokens=5)
    print(f"{store.size()} log entries; usage today:", store.usage("internal-compression", "alice", "demo-run"))
PY
echo "== 5. verify the log"
$DG audit pubkey --db "$DB" > "$WORK/public-key.pem"
$DG audit verify --db "$DB" --public-key "$WORK/public-key.pem"
echo "== 6. export the run (allowed destination: a local folder added to the demo policy)"
mkdir -p "$WORK/policy"
.venv/bin/python - "$WORK" <<'PY'
import json, pathlib, sys
work = pathlib.Path(sys.argv[1]).resolve()
seed = json.loads(pathlib.Path("examples/policies/ml-research-distillation.json").read_text())
seed["allowed_destinations"] = [(work / "exports").as_uri() + "/"]
(work / "policy" / "policy.json").write_text(json.dumps(seed, indent=2))
PY
$DG audit export --db "$DB" --run demo-run --policy "$WORK/policy" --user alice \
  --to "file://$(cd "$WORK" && pwd)/exports/demo-run/"
$DG audit export --db "$DB" --run demo-run --policy "$WORK/policy" --user alice \
  --to "s3://someone-elses-bucket/" || echo "(exit $? = DESTINATION_NOT_APPROVED, as expected)"
echo "== done: store $DB, export $WORK/exports/demo-run/"
