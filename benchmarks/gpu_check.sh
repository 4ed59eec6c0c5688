#!/usr/bin/env bash
# GPU readiness in one command, under 10 minutes on one CUDA GPU:
#
#   bash benchmarks/gpu_check.sh                 # PYTHON=/path/to/python to choose the interpreter
#   bash benchmarks/gpu_check.sh --images 256    # options of benchmarks/gpu_check.py
#
# 1. the tests marked `gpu`; 2. the analysis benchmark on cuda (fp32, bf16 and auto, per stage);
# 3. `reproduce` on generated pictures (fp32 and bf16): images per second; 4. peak GPU memory;
# then one table against the targets (a whole analysis of one image, both models, <= 60 ms on an
# H100-class GPU; reproduce >= 25 images/s). Exit status 0 when every check passes, 1 otherwise.
# Without a CUDA GPU it says so and exits 0. Weights: what the app would load (untrained if none,
# which the table says; speed does not depend on them, `auto` precision does).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

if ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "gpu_check: $PY cannot import torch; install requirements-dev.txt first" >&2
  exit 2
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): nothing to check."
  exit 0
fi

export SANET_VIZ_OFFLINE="${SANET_VIZ_OFFLINE:-1}" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" GRADIO_ANALYTICS_ENABLED=False
WORK="$(mktemp -d -t sanet-viz-gpu-check-XXXXXX)"
echo "gpu_check: $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)'); work folder $WORK"

echo "== 1/4 tests marked gpu"
# Only the files that hold gpu tests: a GPU machine may lack the app's packages (gradio, playwright),
# and one test file that cannot be imported would stop the whole collection.
mapfile -t GPU_TEST_FILES < <(grep -l "pytest.mark.gpu" tests/test_*.py)
timeout 180 "$PY" -m pytest -m gpu -q -p no:cacheprovider "${GPU_TEST_FILES[@]}" 2>&1 | tee "$WORK/pytest.log"
TESTS_STATUS=${PIPESTATUS[0]}

echo "== 2-4/4 analysis benchmark, reproduce throughput, memory"
timeout 480 "$PY" benchmarks/gpu_check.py --work "$WORK" --tests-status "$TESTS_STATUS" \
  --tests-log "$WORK/pytest.log" "$@"
