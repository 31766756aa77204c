#!/usr/bin/env bash
# bench/device.sh OUT_DIR — everything clearmaps measures on a GPU machine, in one call of ~5.5 min on the
# H200 (run 5: 335 s, the equivalence step cut at its limit; worst case, every step at its limit: 10 min).
#
# For the GPU machine of the device tool (H100/H200, CUDA 13, torch 2.11, CuPy 14, numba-cuda, but
# NumPy 2.5, which numba-cuda 0.30 cannot compile with, no captum, and no network). Steps, each under
# its own `timeout` so that one hang cannot eat the budget, logs and JSON packed into OUT_DIR:
#   1. install the carried wheels (.whl/: numpy 2.4, captum) into /tmp/site; make clearmaps importable
#      from the checkout WITHOUT pip (a tree of symlinks mirroring pyproject's package-dir)  install.log
#   2. preflight: versions, GPU, a numba.cuda kernel on CuPy arrays, the exact/TF32 GEMMs   preflight.log
#   2b. warm: compile the sparse kernel's specialisations every timed method will use, in parallel
#      processes, into the shared kernel cache (bench/device_warm.py; their compile times)    warm.log
#   3. the benchmark: allcnn-mnist batch 1024 and vgg16-fcn 224x224 batch 8, ten classes; methods
#      captum-cuda, torch-cuda (fp32, TF32 off), torch-cuda-tf32, cuda (exact), cuda-rows-eager (exact, with
#      the lab's two exact-mode kernels: the row-blocked last conv and the eager switch offsets), cuda-fast
#      (TF32), cuda-fast-tc-wide and cuda-fast-tc-halo-wide (TF32 with the stride-1 convs on the lab's
#      tensor-core kernels, lab/tensor_cores.py, flat and halo, 128-channel tiles on wide layers):
#      the float32 contract against a float64 oracle first (vgg16-fcn: at 64x64, same weights; see
#      bench/device_bench.py), then CUDA-event medians and per-layer breakdowns     bench.log/json/md
#   4. pytest -m gpu: tests/test_cuda_gpu.py and the interop side-stream test          gpu_tests.log
#   4b. the lab's tests (lab/tests: the tensor-core kernels, the row-blocked direct kernel, the eager
#      offsets) on the real GPU, what lab/README.md asks before a promotion                 lab.log
#   5. the variants on allcnn-mnist (cuda-rows: the row-blocked direct kernel for the last transposed conv;
#      cuda-eager: the sparse kernel loading switch offsets ahead of its zero tests; each alone, as
#      cuda-rows-eager of step 3 has them together; cuda-fast-tc and cuda-fast-tc-halo on 64-channel tiles)
#      beside cuda and torch-cuda-tf32
#                                                                                    variants/, variants.log
#   5b. the same variants on vgg16-fcn 224 batch 8                               variants-vgg/, variants_vgg.log
#   6. the CUDA backend's tests of tests/cuda_sim and the property suite (tests/test_backends.py, "cuda"
#      only) on the real GPU (last: each hypothesis geometry compiles its own kernels)  equivalence.log
# Generated kernels are compiled once per machine (5-15 s each) and cached in CLEARMAPS_CACHE_DIR, which
# every step shares. The logs are written to /tmp/clearmaps-logs and, after every step, packed into
# OUT/logs.tgz (the device tool brings back at most 8 files); summary.txt and the tables are copied
# beside it. The benchmark table and a summary are printed LAST.
#
# Wheels (once, on the machine that calls the device tool, in the repository root):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl numpy==2.4.6
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl captum==0.9.0
# Device call: run(command="bash bench/device.sh \"$OUT\"", carry=[".whl"], timeout_s=600)
# Some steps only: STEPS="preflight warm bench gpu_tests" bash bench/device.sh "$OUT"
set -u
OUT="${1:-${OUT:-/tmp/clearmaps-device}}"
LOG=/tmp/clearmaps-logs
rm -rf "$LOG" && mkdir -p "$OUT" "$LOG"
cd "$(dirname "$0")/.." || exit 2
ROOT="$PWD"
T0=$(date +%s)
: > "$LOG/summary.txt"

note() { echo "$*" | tee -a "$LOG/summary.txt"; }
pack() {  # what has been written so far, into OUT: one archive plus the few files worth a direct read
    tar -czf "$OUT/logs.tgz" -C "$LOG" . 2> /dev/null
    cp "$LOG/summary.txt" "$OUT/" 2> /dev/null
    [ -f "$LOG/bench.md" ] && cp "$LOG/bench.md" "$OUT/"
    [ -f "$LOG/bench.json" ] && cp "$LOG/bench.json" "$OUT/"
    [ -f "$LOG/variants/bench.md" ] && cp "$LOG/variants/bench.md" "$OUT/variants.md"
    [ -f "$LOG/variants-vgg/bench.md" ] && cp "$LOG/variants-vgg/bench.md" "$OUT/variants-vgg.md"
    return 0
}

step() {  # step NAME LIMIT_S COMMAND...: run with a timeout, output to LOG/NAME.log, one summary line
    local name=$1 limit=$2 t rc
    shift 2
    if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return 0; fi
    t=$(date +%s)
    echo "== $name (limit ${limit}s) $(date +%T)"
    timeout -k 10 "$limit" "$@" > "$LOG/$name.log" 2>&1
    rc=$?
    note "$name: exit $rc in $(( $(date +%s) - t )) s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
    tail -n 4 "$LOG/$name.log"
    pack
}

# 1. wheels and clearmaps, no network
if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl > "$LOG/install.log" 2>&1 || note "wheel install FAILED (see install.log)"
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
[ -s "$LOG/preflight.log" ] && head -n 20 "$LOG/preflight.log"
export CLEARMAPS_CACHE_DIR=/tmp/clearmaps-cache
step warm 80 python3 -m bench.device_warm
step bench 170 python3 -m bench.device_bench --out "$LOG" --repeats 5
# 165 s: the graph path's tests (every architecture and method, their kernels compiled on first use)
# need ~150 s by the simulator's count; the variants, tuning experiments, give up the difference
step gpu_tests 165 env CLEARMAPS_CUDA_CHECK=1 \
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_gpu.py tests/test_interop_gpu.py
step lab 60 env CLEARMAPS_CUDA_CHECK=1 CLEARMAPS_CUDA_REAL=1 \
    python3 -m pytest -q -p no:cacheprovider lab/tests --ignore lab/tests/test_tensor_cores_compile.py
step variants 35 python3 -m bench.device_bench --out "$LOG/variants" --cases allcnn-mnist-b1024 \
    --methods "$(python3 -c 'from bench.device_bench import VARIANT_METHODS as m; print(m)')" --repeats 5
step variants_vgg 40 python3 -m bench.device_bench --out "$LOG/variants-vgg" --cases vgg16-fcn-b8 \
    --methods "$(python3 -c 'from bench.device_bench import VARIANT_METHODS as m; print(m)')" --repeats 5
step equivalence 20 env CLEARMAPS_CUDA_CHECK=1 CLEARMAPS_CUDA_REAL=1 CLEARMAPS_TEST_BACKENDS=cuda \
    python3 -m pytest -q -p no:cacheprovider tests/cuda_sim tests/test_backends.py

echo
echo "================ clearmaps on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
[ -f "$LOG/bench.md" ] && cat "$LOG/bench.md"
grep -h "breakdown" "$LOG/bench.log" 2> /dev/null  # per-layer steps: bench.log, bench.json
grep -h "ceilings" "$LOG/bench.log" 2> /dev/null
tail -n 1 "$LOG/gpu_tests.log" "$LOG/lab.log" "$LOG/equivalence.log" 2> /dev/null
[ -f "$LOG/variants/bench.md" ] && cat "$LOG/variants/bench.md"
[ -f "$LOG/variants-vgg/bench.md" ] && cat "$LOG/variants-vgg/bench.md"
note "total $(( $(date +%s) - T0 )) s"
pack
