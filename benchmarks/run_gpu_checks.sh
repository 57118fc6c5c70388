#!/usr/bin/env bash
# Every check that needs a CUDA GPU, in one go (GPU time is scarce): environment, the GPU tests,
# the quickstart on the GPU, the benchmark suite on CUDA, then the whole test suite on the GPU machine.
# Usage: bash benchmarks/run_gpu_checks.sh OUTDIR   (run from the repository root; logs and results land in OUTDIR)
# The tests need the fixtures: without ../shared beside the checkout, set LRM_RT_SHARED to a folder holding
# fixtures/ (and docs/keys/ for the encoder key-list tests).
# Each step has its own time limit so that one slow step cannot take the others' results with it, and no step
# runs past DEADLINE_S seconds from the start (default 540: the device tool's 600 s per call, less margin).
set -uo pipefail
final=${1:?usage: run_gpu_checks.sh OUTDIR}
# Remote runners may return only a few files: everything is written to a work folder and packed into
# OUTDIR/results.tgz after every step (so a run killed at its limit still returns what it finished).
out=$(mktemp -d)
mkdir -p "$final"
deadline=${DEADLINE_S:-540}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
# The README's GPU table (about a minute on an H200). onnxruntime is left out: the GPU machine had its CPU
# build only, which the CPU results already cover; tensorrt is listed as unavailable unless installed.
: "${BENCH_ARGS:=--models triposr --resolutions 128,256,512 --batch 1 --network-backends torch-fp32,torch-fp16,tensorrt --field-backends torch,cuda --repeats 5 --warmup 2}"
step() {  # step NAME SECONDS CMD...: run with a limit, log to OUTDIR/NAME.log, record the exit status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS left=$((deadline - SECONDS - 10))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "$name skipped: out of time" | tee -a "$out/status.txt"; return; fi
  echo "== $name: $*"
  timeout -s INT -k 30 "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$out/status.txt"
  tail -n 15 "$out/$name.log"
  tar -C "$out" -czf "$final/results.tgz" .
}

step env 60 bash -c "nvidia-smi; \"$py\" -c 'import torch, cupy; print(\"torch\", torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0)); print(\"cupy\", cupy.__version__, \"CUDA runtime\", cupy.cuda.runtime.runtimeGetVersion())'; \"$py\" -m lrm_rt.cli info"
step pytest-gpu 150 "$py" -m pytest -q -m gpu -rs
step reconstruct 90 "$py" -m lrm_rt.cli reconstruct examples/chair.png --device cuda --field-backend cuda --out "$out/quickstart" --render-views 2
# a second process: the kernels come from CuPy's on-disk cache instead of NVRTC
step reconstruct-again 60 "$py" -m lrm_rt.cli reconstruct examples/chair.png --device cuda --field-backend cuda --out "$out/quickstart"
# shellcheck disable=SC2086
step bench 150 "$py" -m lrm_rt.cli bench --device cuda $BENCH_ARGS --out "$out/bench"
# the field kernels under Nsight Compute (one launch each of the lattice and refinement kernels, TripoSR
# shape at 256^3): occupancy, registers, local memory, throughput - what to change in cuda/field.cuh
ncu_field() {
  local ncu; ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
  [ -n "$ncu" ] || { echo "no ncu"; return 3; }
  "$ncu" --clock-control none --kernel-name regex:lrm_field_ --launch-count 4 --set detailed --export "$out/field" --force-overwrite \
      "$py" -m lrm_rt.cli bench --device cuda --models triposr --resolutions 256 --batch 1 \
      --network-backends torch-fp16 --field-backends cuda --repeats 1 --warmup 1 --no-plots --out /tmp/ncu-bench \
    && "$ncu" --import "$out/field.ncu-rep" --print-summary none
}
# the C library's CUDA build: compile with nvcc, export the TripoSR fixture as a CUDA AOTInductor
# package, reconstruct with --device cuda, compare with the Python reconstruction of the same checkpoint
capi_cuda() {
  command -v nvcc && command -v cmake || { echo "nvcc or cmake missing"; return 3; }
  local b=/tmp/capi-cuda fx=${LRM_RT_SHARED:-$PWD/..}/fixtures/checkpoints/triposr-tiny
  cmake -S . -B $b -DCMAKE_BUILD_TYPE=Release -DLRM_RT_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=native \
        -DPython3_EXECUTABLE="$(command -v "$py")" \
        -DCMAKE_PREFIX_PATH="$("$py" -c 'import torch; print(torch.utils.cmake_prefix_path)')" || return
  cmake --build $b -j 16 --target lrm_rt_reconstruct mesh_compare || return
  "$py" -m lrm_rt.cli export --model "$fx" --out /tmp/export-cuda --aoti --aoti-device cuda --quiet || return
  "$py" -m lrm_rt.cli reconstruct "$fx/input.png" --model "$fx" --mc-resolution 64 --precision fp32 \
        --device cpu --out /tmp/python.ply --quiet || return
  $b/lrm-rt-reconstruct /tmp/export-cuda "$fx/input.png" /tmp/c-cuda.ply --mc-resolution 64 --device cuda || return
  $b/tests/cpp/mesh_compare /tmp/c-cuda.ply /tmp/python.ply --chamfer-tol 1e-4 --vertex-tol 1e-3 --color-tol 2
}
export -f ncu_field capi_cuda
export py out final
step ncu-field 120 bash -c ncu_field
step capi-cuda 300 bash -c capi_cuda
xdist=$("$py" -c "import xdist" 2>/dev/null && echo "-n 8")
# shellcheck disable=SC2086
step pytest-all 180 "$py" -m pytest -q -p no:cacheprovider -m "not slow" $xdist
cp "$out/status.txt" "$final/"
cat "$out/status.txt"
