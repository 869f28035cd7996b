#!/usr/bin/env bash
# GPU evidence in one run (issue 16), about 8 minutes on an H200:
#   1. the Triton kernel tests compiled on the GPU against the PyTorch reference (pytest -m gpu);
#   2. bench/bench_kernels.py: prefix-width GEMMs, SwiGLU MLP, decode under CUDA graphs, ragged widths;
#   3. bench/bench_gpu_profile.py: flex profile --device cuda (decode under CUDA graphs, prefill 2048).
# Everything lands in $OUT (logs, JSON, markdown); copy the JSON/markdown into docs/results/.
#
#   on the GPU machine:  OUT=/some/dir bash bench/gpu_check.sh
#   dry run on a CPU:    DRY_RUN=1 OUT=/tmp/gpu bash bench/gpu_check.sh   (toy sizes, same steps)
#
# The GPU image has torch, triton, transformers, typer, rich, safetensors and pyyaml but no network:
# flexcli is installed from this checkout without dependencies. PY picks the interpreter (default python3).
set -uo pipefail
OUT=${OUT:?set OUT to the folder for the results}
PY=${PY:-python3}
DRY=${DRY_RUN:-0}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
cd "$(dirname "$0")/.."
status=0

step() {  # step NAME CMD...: run, log to $OUT/NAME.log, record exit code and seconds in $OUT/steps.txt
    local name=$1
    shift
    local t0=$SECONDS
    echo "== $name: $*"
    "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "$name exit=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/steps.txt"
    [ "$rc" -eq 0 ] || status=1
}

if ! $PY -c "import flexcli" 2>/dev/null; then
    $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
fi
$PY -c "import torch, triton, flexcli; print('torch', torch.__version__, 'triton', triton.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" | tee "$OUT/steps.txt"

if [ "$DRY" = 1 ]; then
    step kernel_tests env TRITON_INTERPRET=1 $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py
    step bench_kernels $PY bench/bench_kernels.py --dry-run --out "$OUT"
    step gpu_profile $PY bench/bench_gpu_profile.py --dry-run --out "$OUT" --work "$OUT/work"
else
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee -a "$OUT/steps.txt"
    step kernel_tests $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels.py
    step bench_kernels $PY bench/bench_kernels.py --out "$OUT"
    step gpu_profile $PY bench/bench_gpu_profile.py --out "$OUT" --work /tmp/flex-gpu-work
fi
rm -rf "$OUT/work"
exit $status
