#!/usr/bin/env bash
# Train lrm-tiny on a lent GPU machine in one device call: fresh data on its CPU cores, then train.py on the GPU
# from the shipped weights, then the weights back for export.py / evaluate.py here.
#
#   bash training/gpu_run.sh prepare         # here, once: fills .carry/ (git-ignored) with what the GPU machine
#                                            # lacks: trimesh, rtree, embreex and PyMCubes wheels (Python 3.12),
#                                            # training meshes, the GPU tests' fixtures
#   bash training/gpu_run.sh run OUTDIR      # there (device tool, carry [".carry"]): weights + logs in OUTDIR
#   bash training/gpu_run.sh continue OUTDIR # there again while the machine is warm (its data and checkpoint
#                                            # are still there): a warm restart (lr 3e-4) for DEADLINE_S
#   cat OUTDIR/gpu_model.pt.part-* > gpu_model.pt
#   python training/export.py --ckpt gpu_model.pt --out DIR && python training/evaluate.py --model DIR
#
# Env: DEADLINE_S (`run`: default 470, training ends that long after the start, taking what data generation
# leaves, and a short benchmark fills the rest of the device call's 600 s; `continue`: default 540), JOBS (data
# processes, default: all cores, less one while the GPU tests run), SEED_BASE (first data seed, default 200: new
# objects after stage 7's 100-114), SHAPES (procedural objects per process, default 800; plus 20 poses of each
# training mesh), INIT (the model folder `run` starts from, default lrm_rt/models_data/lrm-tiny, where
# `python training/export.py` puts your own CPU stages; another folder must be inside the checkout and not
# git-ignored to travel, and its 19 MiB must fit beside tree and .carry in the call's 64 MiB), TRAIN_ARGS (passed on to train.py, after the defaults
# below), DEVICE (cuda). Paths are taken from the checkout's root, wherever the script is started.
set -euo pipefail
usage="usage: gpu_run.sh prepare | run OUTDIR | continue OUTDIR"
cmd=${1:?$usage}
case "$cmd" in
  prepare|run|continue) ;;
  *) echo "$usage" >&2; exit 2 ;;
esac
[ "$cmd" = prepare ] || out=$(realpath -m "${2:?$usage}")
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
carry=${CARRY:-.carry}

if [ "$cmd" = prepare ]; then  # the working tree and what it carries travel within 64 MiB: training meshes only
  rm -rf "$carry" && mkdir -p "$carry/wheels" "$carry/shared/data/meshes"
  # the versions this checkout's data was made with; the GPU image has numpy, scipy, networkx and pillow. PyMCubes:
  # the baseline's marching cubes (the bench and one GPU test), missing from the H200 image on 2026-11-27
  "$py" -m pip download -q trimesh==5.2.0 rtree==1.4.1 embreex==4.4.0.post1 PyMCubes==0.1.6 \
      --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$carry/wheels"
  shared=${LRM_RT_SHARED:-../shared}
  meshes=$("$py" -c "import sys; sys.path.insert(0, 'training'); import data_gen as D
print(' '.join(n for n in D.MESH_FILES if n not in D.HELDOUT_MESHES))")  # a failure here stops the script
  for m in $meshes; do
    cp -r "$shared/data/meshes/$m" "$carry/shared/data/meshes/"
  done
  chmod -R u+w "$carry/shared"
  # data_gen.py reads base colour only: the other PBR maps (13 MB) become 1x1 images, which the glTF loader
  # still finds, so that the GPU tests' fixtures (below) fit in the call too
  find "$carry/shared/data/meshes" -iname '*.png' \
      \( -iname '*normal*' -o -iname '*roughness*' -o -iname '*occlusion*' -o -iname '*emissive*' \) \
      -exec "$py" -c "import sys; from PIL import Image; [Image.new('RGB', (1, 1)).save(f) for f in sys.argv[1:]]" {} +
  # what `pytest -m gpu` reads (the reference tensors and weights of the three fixture models)
  mkdir -p "$carry/shared/fixtures"
  cp "$shared"/fixtures/{triposr,openlrm,openlrm_v10}_tiny_{io,weights}.safetensors "$carry/shared/fixtures/"
  du -sh "$carry"
  exit 0
fi

mkdir -p "$out"
t0=$SECONDS
ckpt=training/data/ckpt/gpu.pt
save_weights() {  # the weights, step and arguments only (export.py reads these; the optimiser state would
  # triple the size), in 15 MB parts: here, cat OUTDIR/gpu_model.pt.part-* > gpu_model.pt
  "$py" -c "
import torch, sys
ck = torch.load(sys.argv[1], map_location='cpu', weights_only=False)
torch.save({k: ck[k] for k in ('model', 'step', 'minutes', 'args')}, sys.argv[2])
" "$ckpt" "$1/gpu_model.pt"
  split -b 15M "$1/gpu_model.pt" "$out/gpu_model.pt.part-"
}

if [ "$cmd" = continue ]; then  # stage 7's second call: same data, weights and AdamW state, a fresh schedule
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  data=$(cd training/data && ls gpu_s*.npz | sed 's/\.npz$//' | paste -sd, -)
  minutes=$("$py" -c "print(max(0.5, (${DEADLINE_S:-540} - 45) / 60))")  # 45 s: loading and saving
  # shellcheck disable=SC2086
  "$py" training/train.py --device "${DEVICE:-cuda}" --data "$data" --resume --new-stage \
      --batch 64 --views 4 --rays 384 --lr 3e-4 --warmup 50 --depth-weight 2.0 --mask-weight 1.5 \
      --minutes "$minutes" --steps 1000000 --save-every 2 --ckpt "$ckpt" ${TRAIN_ARGS:-} 2>&1 \
      | awk 'NR % 4 == 1 || !/^step /' > "$out/train.log"  # every 4th progress line: the log comes back whole
  save_weights "$tmp"
  echo "done in $((SECONDS - t0)) s"; tail -n 2 "$out/train.log"
  exit 0
fi

deadline=${DEADLINE_S:-470}
carry=$(realpath "$carry")
site=$(mktemp -d) logs=$(mktemp -d)
trap 'rm -rf "$site" "$logs"' EXIT
"$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$carry"/wheels/*.whl
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" LRM_RT_SHARED="$carry/shared" PYTHONUNBUFFERED=1
"$py" -c "import trimesh.ray; assert trimesh.ray.has_embree, 'no embree: data generation would take hours'"
# $OUT comes back as at most 8 files of at most 16 MiB each: status.txt, gen.log, train.log, the weights in two
# parts, pytest-gpu.log, bench.tgz
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no nvidia-smi"; } | tee "$out/status.txt"

# the GPU tests run while the CPU cores make data (the GPU is idle then): one core is left to them
pytest_pid=
if [ -d "$carry/shared/fixtures" ]; then
  PYTHONPATH="$PWD:$PYTHONPATH" timeout -s INT -k 20 240 "$py" -m pytest -q -p no:cacheprovider -m gpu -rs \
      tests/test_cuda_field.py tests/test_marching_cubes.py tests/test_render_kernels.py tests/test_training.py \
      > "$out/pytest-gpu.log" 2>&1 &
  pytest_pid=$!
fi
jobs=${JOBS:-$(nproc)}
[ -n "$pytest_pid" ] && [ -z "${JOBS:-}" ] && jobs=$((jobs - 1))
names=() gen_pids=()
for i in $(seq 0 $((jobs - 1))); do
  # seeds 0-3 made stages 2-6's data and 100-114 stage 7's; 1000+ are the held-out and tuning streams
  seed=$(( ${SEED_BASE:-200} + i ))
  names+=("gpu_s$seed")
  OMP_NUM_THREADS=1 "$py" training/data_gen.py --splits train --views 10 --n-shapes "${SHAPES:-800}" \
      --mesh-instances 20 --seed "$seed" --train-name "gpu_s$seed" > "$logs/gen_$seed.log" 2>&1 &
  gen_pids+=($!)
done
wait "${gen_pids[@]}" || true  # a failed process shows in gen.log, and train.py names the missing file
tail -n 3 "$logs"/gen_*.log > "$out/gen.log"
echo "data: $jobs x $(( ${SHAPES:-800} + 100 )) objects in $((SECONDS - t0)) s" | tee -a "$out/status.txt"

minutes=$("$py" -c "print(max(0.5, ($deadline - ($SECONDS - $t0) - 60) / 60))")  # 60 s: loading and saving
data=$(IFS=,; echo "${names[*]}")
# shellcheck disable=SC2086
"$py" training/train.py --device "${DEVICE:-cuda}" --init-weights "${INIT:-lrm_rt/models_data/lrm-tiny}" \
    --data "$data" --batch 64 --views 4 --rays 384 --lr 6e-4 --warmup 100 --depth-weight 2.0 --mask-weight 1.5 \
    --minutes "$minutes" --steps 1000000 --save-every 2 --ckpt "$ckpt" ${TRAIN_ARGS:-} \
    2>&1 | tee "$out/train.log"
save_weights "$logs"
echo "training done in $((SECONDS - t0)) s" | tee -a "$out/status.txt"
if [ -n "$pytest_pid" ]; then
  wait "$pytest_pid" && rc=0 || rc=$?
  echo "pytest -m gpu rc=$rc: $(tail -n 1 "$out/pytest-gpu.log")" | tee -a "$out/status.txt"
fi
# what is left of the call (BENCH_END_S, default 585 s from the start) measures the shipped field kernels
# against the PyTorch baseline; the suite writes what finished when interrupted
left=$(( ${BENCH_END_S:-585} - (SECONDS - t0) ))
if [ "$left" -ge 40 ]; then
  PYTHONPATH="$PWD:$PYTHONPATH" timeout -s INT -k 10 "$left" "$py" -m lrm_rt.cli bench --device cuda \
      --models triposr --resolutions 256,512 --batch 1 --network-backends torch-fp32,torch-fp16 \
      --field-backends torch,cuda --repeats 3 --no-plots --out "$logs/bench" > "$logs/bench.log" 2>&1 \
      && rc=0 || rc=$?
  echo "bench rc=$rc in $((SECONDS - t0)) s" | tee -a "$out/status.txt"
  cp "$logs/bench.log" "$logs/bench/" 2>/dev/null || true
  tar -C "$logs" -czf "$out/bench.tgz" bench 2>/dev/null || cp "$logs/bench.log" "$out/"
fi
