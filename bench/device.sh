#!/usr/bin/env bash
# bench/device.sh OUT_DIR — everything clearmaps measures on a GPU machine, in one call of ~2.5 min
# (worst case, every step at its limit: 10 min).
#
# For the GPU machine of the device tool (H100/H200, CUDA 13, torch 2.11, CuPy 14, numba-cuda, but
# NumPy 2.5, which numba-cuda 0.30 cannot compile with, no captum, and no network). Steps, each under
# its own `timeout` so that one hang cannot eat the budget, logs and JSON written to OUT_DIR:
#   1. install the carried wheels (.whl/: numpy 2.4, captum) into /tmp/site; make clearmaps importable
#      from the checkout WITHOUT pip (a tree of symlinks mirroring pyproject's package-dir)  install.log
#   2. preflight: versions, GPU, a numba.cuda kernel on CuPy arrays, the exact/TF32 GEMMs   preflight.log
#   3. the benchmark: allcnn-mnist batch 1024 and vgg16-fcn 224x224 batch 8, ten classes; methods
#      captum-cuda, torch-cuda (fp32, TF32 off), torch-cuda-tf32, cuda (exact), cuda-gemm (exact, the
#      columns + GEMM path instead of the sparse kernel), cuda-fast (TF32):
#      the float32 contract against a float64 oracle first (vgg16-fcn: at 64x64, same weights; see
#      bench/device_bench.py), then CUDA-event medians and per-layer breakdowns     bench.log/json/md
#   4. pytest -m gpu: tests/test_cuda_gpu.py and the interop side-stream test          gpu_tests.log
#   5. the CUDA equivalence tests of tests/cuda_sim on the real GPU                   equivalence.log
#   6. the sparse kernel's variants on allcnn-mnist (cuda-sparse: every stride-1 conv; cuda-cpt1: one
#      output channel per thread; cuda-8x8: 8x8 tiles) beside cuda and torch-cuda        variants/, variants.log
# Generated kernels are compiled once per machine (5-15 s each) and cached in CLEARMAPS_CACHE_DIR, which
# every step shares.
# and prints the benchmark table and a summary LAST.
#
# Wheels (once, on the machine that calls the device tool, in the repository root):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl numpy==2.4.6
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl captum==0.9.0
# Device call: run(command="bash bench/device.sh \"$OUT\"", carry=[".whl"], timeout_s=600)
set -u
OUT="${1:-${OUT:-/tmp/clearmaps-device}}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 2
ROOT="$PWD"
T0=$(date +%s)
: > "$OUT/summary.txt"

note() { echo "$*" | tee -a "$OUT/summary.txt"; }

step() {  # step NAME LIMIT_S COMMAND...: run with a timeout, output to OUT/NAME.log, one summary line
    local name=$1 limit=$2 t rc
    shift 2
    t=$(date +%s)
    echo "== $name (limit ${limit}s) $(date +%T)"
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    note "$name: exit $rc in $(( $(date +%s) - t )) s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
    tail -n 4 "$OUT/$name.log"
    return 0
}

# 1. wheels and clearmaps, no network
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl > "$OUT/install.log" 2>&1 || note "wheel install FAILED (see install.log)"
else
    note "no .whl/ folder: running with the image's packages (NumPy 2.5 breaks numba-cuda 0.30)"
fi
rm -rf /tmp/cm && mkdir -p /tmp/cm/clearmaps
for f in bindings/*; do ln -s "$ROOT/$f" /tmp/cm/clearmaps/; done
ln -s "$ROOT/reference" /tmp/cm/clearmaps/reference
ln -s "$ROOT/kernels" /tmp/cm/clearmaps/kernels
export PYTHONPATH="/tmp/site:/tmp/cm:$ROOT" PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci
export NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0

# 2-6, the benchmark first: it is what the run is for
step preflight 30 python3 -m bench.device_preflight
[ -s "$OUT/preflight.log" ] && head -n 20 "$OUT/preflight.log"
export CLEARMAPS_CACHE_DIR=/tmp/clearmaps-cache
step bench 240 python3 -m bench.device_bench --out "$OUT" --repeats 5
export CLEARMAPS_CUDA_CHECK=1
step gpu_tests 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_gpu.py tests/test_interop_gpu.py
export CLEARMAPS_CUDA_REAL=1
step equivalence 120 \
    python3 -m pytest -q -p no:cacheprovider tests/cuda_sim
unset CLEARMAPS_CUDA_CHECK CLEARMAPS_CUDA_REAL
step variants 90 python3 -m bench.device_bench --out "$OUT/variants" --cases allcnn-mnist-b1024 \
    --methods "$(python3 -c 'from bench.device_bench import VARIANT_METHODS as m; print(m)')" --repeats 5

echo
echo "================ clearmaps on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
[ -f "$OUT/bench.md" ] && cat "$OUT/bench.md"
grep -h "breakdown" "$OUT/bench.log" 2> /dev/null  # per-layer steps: bench.log, bench.json
grep -h "ceilings" "$OUT/bench.log" 2> /dev/null
tail -n 1 "$OUT/gpu_tests.log" "$OUT/equivalence.log" 2> /dev/null
[ -f "$OUT/variants/bench.md" ] && cat "$OUT/variants/bench.md"
note "total $(( $(date +%s) - T0 )) s"
