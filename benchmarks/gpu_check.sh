#!/usr/bin/env bash
# The GPU check, in under 8 minutes on one H100-class GPU (each step capped: 120 + 150 + 90 + 115 s):
#   1. installs smear (editable, with the test extra) into the python in use;
#   2. runs the test suite's GPU-relevant tests (devices, YOLO, classifier, pipeline, ONNX, INT8);
#   3. compares CPU (fp32) and GPU (fp16, as `smear run` on CUDA) reports on the demo slide and on
#      60 BCCD test fields: counts per class, and every cell whose label differs;
#   4. prints the pipeline's fields/s with batched fields at fp16 and fp32, batch 8, 32 and 64.
#
# Usage: bash benchmarks/gpu_check.sh                  (on a machine with CUDA)
#        DEVICE=cpu N=16 SECONDS_EACH=2 bash benchmarks/gpu_check.sh   (its CPU path, as tested here)
# Settings: PYTHON (default python3), DATA (default ../shared/data), DEVICE (default cuda),
#           N (fields timed, default 640), SECONDS_EACH (time per setting, default 15),
#           SKIP_INSTALL=1, SKIP_TESTS=1.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
PYTHON=${PYTHON:-python3}
DATA=${DATA:-../shared/data}
DEVICE=${DEVICE:-cuda}
N=${N:-640}
SECONDS_EACH=${SECONDS_EACH:-12}
COMPARE_N=${COMPARE_N:-60}
CAP=${CAP:-1}
export YOLO_OFFLINE=1 HF_HUB_OFFLINE=1
step() { echo; echo "== $1 ($(( $(date +%s) - start )) s)"; }

step "machine"
"$PYTHON" - <<'EOF'
import platform, torch
print(platform.platform(), "| python", platform.python_version(), "| torch", torch.__version__,
      "| CUDA", torch.version.cuda, "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
EOF
if [ "$DEVICE" != "cpu" ]; then
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: run with DEVICE=cpu')"
fi

if [ "${SKIP_INSTALL:-0}" != "1" ]; then
  step "install smear (pip install -e .[test]; a CUDA torch already installed is kept)"
  timeout $((120 * CAP)) "$PYTHON" -m pip install --progress-bar off -q -e ".[test]"
fi

if [ "${SKIP_TESTS:-0}" != "1" ]; then
  step "GPU-relevant tests"
  timeout $((150 * CAP)) "$PYTHON" -m pytest -q -x -p no:cacheprovider tests/test_devices.py tests/test_classify_model.py \
    tests/test_pipeline.py tests/test_int8.py tests/test_onnx.py -k "not imports_neither"
fi

step "CPU vs $DEVICE reports, demo slide and $COMPARE_N BCCD test fields"
timeout $((90 * CAP)) "$PYTHON" benchmarks/gpu_speed.py --device "$DEVICE" --data "$DATA/bccd/test/images" --no-speed \
  --compare-n "$COMPARE_N"

step "fields/s, fp16 and fp32, batch 8 / 32 / 64"
timeout $((115 * CAP)) "$PYTHON" benchmarks/gpu_speed.py --device "$DEVICE" --data "$DATA/bccd/test/images" --no-compare \
  --n "$N" --seconds "$SECONDS_EACH"

step "done in $(( $(date +%s) - start )) s"
