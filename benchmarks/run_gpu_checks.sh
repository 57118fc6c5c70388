#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one go (GPU time is scarce): environment, the GPU tests,
# the quickstart on the GPU, the benchmark suite on CUDA, then the whole test suite on the GPU machine.
# Usage: bash benchmarks/run_gpu_checks.sh OUTDIR   (run from the repository root; logs and results land in OUTDIR)
# The tests need the fixtures: without ../shared beside the checkout, set LRM_RT_SHARED to a folder holding
# fixtures/ (and docs/keys/ for the encoder key-list tests).
# Each step has its own time limit so that one slow step cannot take the others' results with it.
set -uo pipefail
out=${1:?usage: run_gpu_checks.sh OUTDIR}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
# The README's GPU table (about a minute on an H200). onnxruntime is left out: the GPU machine had its CPU
# build only, which the CPU results already cover; tensorrt is listed as unavailable unless installed.
: "${BENCH_ARGS:=--models triposr --resolutions 128,256,512 --batch 1 --network-backends torch-fp32,torch-fp16,tensorrt --field-backends torch,cuda,cuda-compact --repeats 5 --warmup 2}"
step() {  # step NAME SECONDS CMD...: run with a limit, log to OUTDIR/NAME.log, record the exit status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name: $*"
  timeout -s INT -k 30 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$out/status.txt"
  tail -n 15 "$out/$name.log"
}

step env 60 bash -c "nvidia-smi; \"$py\" -c 'import torch, cupy; print(\"torch\", torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0)); print(\"cupy\", cupy.__version__, \"CUDA runtime\", cupy.cuda.runtime.runtimeGetVersion())'; \"$py\" -m lrm_rt.cli info"
step pytest-gpu 150 "$py" -m pytest -q -m gpu -rs
step reconstruct 90 "$py" -m lrm_rt.cli reconstruct examples/chair.png --device cuda --field-backend cuda --out "$out/quickstart" --render-views 2
# a second process: the kernels come from CuPy's on-disk cache instead of NVRTC
step reconstruct-again 60 "$py" -m lrm_rt.cli reconstruct examples/chair.png --device cuda --field-backend cuda --out "$out/quickstart"
# shellcheck disable=SC2086
step bench 240 "$py" -m lrm_rt.cli bench --device cuda $BENCH_ARGS --out "$out/bench"
xdist=$("$py" -c "import xdist" 2>/dev/null && echo "-n 8")
# shellcheck disable=SC2086
step pytest-all 180 "$py" -m pytest -q -p no:cacheprovider -m "not slow" $xdist
# some remote runners return few files: pack the folders into one archive (8 files in OUTDIR in all)
dirs=$(cd "$out" && ls -d bench quickstart 2>/dev/null)
# shellcheck disable=SC2086
[ -n "$dirs" ] && tar -C "$out" -czf "$out/results.tgz" $dirs && (cd "$out" && rm -rf $dirs)
cat "$out/status.txt"
