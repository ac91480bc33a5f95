#!/usr/bin/env bash
# `make demo`: the main job, `distillgate run examples/banking77/project.yaml`, offline on banking77: a retrieval-
# augmented local teacher (SmolLM2-135M-Instruct shown its 8 nearest labelled examples) labels 2,000 messages
# through the policy gateway; an encoder student (all-MiniLM-L6-v2 + head, served int8) learns its label
# distributions (kd) and, for comparison, its hard labels (sft); both are evaluated on the project's own ~570 test
# and golden items. Then the front page in words, the headline numbers and a check of the decision log.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
DG=".venv/bin/distillgate"
PROJECT="examples/banking77/project.yaml"
WORK="runs/banking77-demo"
START=$(date +%s)

$DG run "$PROJECT" "$@"

echo
echo "== what the study found ($WORK/report.html)"
.venv/bin/python - "$WORK/metrics.json" <<'PY'
import json, sys
from distillgate.pipeline.study import front_page
m = json.load(open(sys.argv[1]))
for line in front_page(m):
    print(" -", line)
def est(v):
    if isinstance(v, dict) and "estimate" in v:
        e, lo, hi = v["estimate"], v.get("low"), v.get("high")
        if e is None:
            return "undefined"
        return f"{e:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")
    return f"{v:.3f}" if isinstance(v, float) else str(v)
for suite, s in m["suites"].items():
    h = s["headline"]
    print(f"\n{suite} ({s['items']} items)")
    for key in ("teacher_accuracy", "student_accuracy", "accuracy_retention", "agreement", "student_traffic_share",
                "routing_threshold", "speedup_mean_latency"):
        if key in h:
            print(f"  {key.replace('_', ' '):<24} {est(h[key])}")
    lift = (h.get("recipe_lift") or {}).get("accuracy")
    if lift:
        a, b = [k for k in lift if k != "lift"]
        print(f"  {a} - {b} accuracy lift      {est(lift['lift'])}")
print(f"\ndataset version {m['dataset_version'][:16]}; policies {', '.join(p['policy_id'] for p in m['policies'])}")
PY
echo
$DG audit verify --db "$WORK/distillgate.db"
echo "report: $WORK/report.html   (wall time $(( $(date +%s) - START ))s for the run)"
