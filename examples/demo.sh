#!/usr/bin/env bash
# `make demo`: the main job, `distillgate run examples/banking77/project.yaml`, offline on banking77 with the local
# teacher (SmolLM2-135M-Instruct), then the headline numbers and a check of the decision log.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
DG=".venv/bin/distillgate"
PROJECT="examples/banking77/project.yaml"
WORK="runs/banking77-demo"

$DG run "$PROJECT" "$@"

echo
echo "== headline numbers ($WORK/metrics.json)"
.venv/bin/python - "$WORK/metrics.json" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
def est(v):
    if isinstance(v, dict) and "estimate" in v:
        lo, hi = v.get("low"), v.get("high")
        e = v["estimate"]
        if e is None:
            return "undefined"
        return f"{e:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")
    return f"{v:.3f}" if isinstance(v, float) else str(v)
for suite, s in m["suites"].items():
    h = s["headline"]
    print(f"{suite} ({s['items']} items)")
    for key in ("teacher_accuracy", "student_accuracy", "agreement", "accuracy_retention", "student_traffic_share",
                "speedup_mean_latency"):
        if key in h:
            print(f"  {key.replace('_', ' '):<24} {est(h[key])}")
    for key in ("over_refusal", "under_refusal"):
        if key in h:
            print(f"  {key.replace('_', ' '):<24} teacher {est(h[key]['teacher'])}  student {est(h[key]['student'])}")
print(f"dataset version {m['dataset_version'][:16]}; policies {', '.join(p['policy_id'] for p in m['policies'])}")
PY
echo
$DG audit verify --db "$WORK/distillgate.db"
echo "report: $WORK/report.html"
