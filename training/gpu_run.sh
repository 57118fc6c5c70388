#!/usr/bin/env bash
# Train lrm-tiny on a lent GPU machine in one device call: fresh data on its CPU cores, then train.py on the GPU
# from the shipped weights, then the weights back for export.py / evaluate.py here.
#
#   bash training/gpu_run.sh prepare         # here, once: fills .carry/ (git-ignored) with what the GPU machine
#                                            # lacks: trimesh + rtree + embreex wheels (Python 3.12), training meshes
#   bash training/gpu_run.sh run OUTDIR      # there (device tool, carry [".carry"]): weights + logs in OUTDIR
#   cat OUTDIR/gpu_model.pt.part-* > gpu_model.pt
#   python training/export.py --ckpt gpu_model.pt --out DIR && python training/evaluate.py --model DIR
#
# Env: DEADLINE_S (default 540: the run ends that long after it starts, training takes what data generation
# leaves), JOBS (data processes, default: all cores), SHAPES (procedural objects per process, default 800; plus
# 20 poses of each training mesh), TRAIN_ARGS (passed on to train.py, after the defaults below), DEVICE (cuda).
set -euo pipefail
cmd=${1:?usage: gpu_run.sh prepare | run OUTDIR}
py=${PYTHON:-python3}
carry=${CARRY:-.carry}

if [ "$cmd" = prepare ]; then  # the working tree and what it carries travel within 64 MiB: training meshes only
  rm -rf "$carry" && mkdir -p "$carry/wheels" "$carry/shared/data/meshes"
  # the versions this checkout's data was made with; the GPU image has numpy, scipy, networkx and pillow
  "$py" -m pip download -q trimesh==5.2.0 rtree==1.4.1 embreex==4.4.0.post1 --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$carry/wheels"
  for m in $("$py" -c "import sys; sys.path.insert(0, 'training'); import data_gen as D
print(' '.join(n for n in D.MESH_FILES if n not in D.HELDOUT_MESHES))"); do
    cp -r "${LRM_RT_SHARED:-../shared}/data/meshes/$m" "$carry/shared/data/meshes/"
  done
  du -sh "$carry"
  exit 0
fi

out=${2:?usage: gpu_run.sh run OUTDIR}
mkdir -p "$out"
t0=$SECONDS
deadline=${DEADLINE_S:-540}
carry=$(realpath "$carry")
site=$(mktemp -d) logs=$(mktemp -d)
trap 'rm -rf "$site" "$logs"' EXIT
"$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$carry"/wheels/*.whl
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" LRM_RT_SHARED="$carry/shared" PYTHONUNBUFFERED=1
"$py" -c "import trimesh.ray; assert trimesh.ray.has_embree, 'no embree: data generation would take hours'"
# $OUT comes back as at most 8 files of at most 16 MiB each: status.txt, gen.log, train.log, the weights in parts
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no nvidia-smi"; } | tee "$out/status.txt"

jobs=${JOBS:-$(nproc)}
names=()
for i in $(seq 0 $((jobs - 1))); do
  seed=$((100 + i))  # seeds 0-3 made the shipped model's data; 1000+ are the held-out and tuning streams
  names+=("gpu_s$seed")
  OMP_NUM_THREADS=1 "$py" training/data_gen.py --splits train --views 10 --n-shapes "${SHAPES:-800}" \
      --mesh-instances 20 --seed "$seed" --train-name "gpu_s$seed" > "$logs/gen_$seed.log" 2>&1 &
done
wait
tail -n 3 "$logs"/gen_*.log > "$out/gen.log"
echo "data: $jobs x $(( ${SHAPES:-800} + 100 )) objects in $((SECONDS - t0)) s" | tee -a "$out/status.txt"

minutes=$("$py" -c "print(max(0.5, ($deadline - ($SECONDS - $t0) - 60) / 60))")  # 60 s: loading and saving
data=$(IFS=,; echo "${names[*]}")
# shellcheck disable=SC2086
"$py" training/train.py --device "${DEVICE:-cuda}" --init-weights lrm_rt/models_data/lrm-tiny --data "$data" \
    --batch 64 --views 4 --rays 384 --lr 6e-4 --warmup 100 --depth-weight 2.0 --mask-weight 1.5 \
    --minutes "$minutes" --steps 1000000 --save-every 2 --ckpt training/data/ckpt/gpu.pt ${TRAIN_ARGS:-} \
    2>&1 | tee "$out/train.log"
# the weights, step and arguments only (export.py reads these; the optimiser state would triple the size), in
# 15 MB parts: here, cat OUTDIR/gpu_model.pt.part-* > gpu_model.pt
"$py" -c "
import torch, sys
ck = torch.load('training/data/ckpt/gpu.pt', map_location='cpu', weights_only=False)
torch.save({k: ck[k] for k in ('model', 'step', 'minutes', 'args')}, sys.argv[1])
" "$logs/gpu_model.pt"
split -b 15M "$logs/gpu_model.pt" "$out/gpu_model.pt.part-"
echo "done in $((SECONDS - t0)) s" | tee -a "$out/status.txt"
