#!/bin/bash
# A prepared device call (written 2026-12-04 for a session lent a GPU, 15 minutes of device time; that day's call
# was refused, so it has not run yet): (1) every script's --smoke run on
# CUDA, (2) the CUDA tests, (3) `python -m common.bench`, (4) laptop-protocol runs on the GPU until a deadline:
# seeds missing on the CPU as of 2026-12-04 (TBBN seed 2, CIM seeds 1 and 2, Genifer seed 2: edit (4) to what is
# still missing) and a GPU twin of a CPU run
# (LUCIR's ladder, seed 1) to measure what the device changes. Everything runs fp32 (--no-amp; cuDNN's TF32
# convolutions stay on, as common/device.py sets them). Needs the laptop subset in gpu_data/, carried:
# `python runs/gpu/make_subset.py` here, then the device call with carry ["gpu_data"].
# Usage there: DEADLINE=520 bash runs/gpu/device_check.sh   (results into $OUT: logs, bench, results tarball)
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
O=${OUT:-/tmp/out}; mkdir -p "$O"; R=gpu_results; mkdir -p "$R" /tmp/bin
START=$(date +%s); DEADLINE=${DEADLINE:-520}
ln -sf "$(command -v python3)" /tmp/bin/python; export PATH=/tmp/bin:$PATH   # run_all.sh calls `python`
left() { echo $((DEADLINE - ($(date +%s) - START))); }
{ nvidia-smi; nproc; python -c "import torch, torchvision, timm, numpy, scipy; print('torch', torch.__version__,
  'torchvision', torchvision.__version__, 'timm', timm.__version__, 'numpy', numpy.__version__, 'scipy',
  scipy.__version__, torch.cuda.get_device_name())"; } > "$O/env.txt" 2>&1

if [ -z "${SKIP_CHECKS:-}" ]; then  # SKIP_CHECKS=1: only the runs (a dry run of this script)
# (1) every script's --smoke run as run_all.sh --smoke runs it, all five at once, beside (2) the CUDA tests (the rest of
# the suite forces the CPU: tests/conftest.py)
smoke_flags() { case $1 in lucir) ;; bsce) echo --paired loss ;; *) echo --paired ;; esac; }
for s in lucir tbbn bsce cim genifer; do
  (timeout 90 python $s.py --smoke $(smoke_flags $s) --out-dir $R/smoke/$s > $R/smoke_$s.log 2>&1
   echo "smoke $s exit $?" >> $R/smoke_$s.log) &
done
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_graph.py tests/test_bf16.py > "$O/pytest.txt" 2>&1
echo "pytest exit $? at $(( $(date +%s) - START )) s" >> "$O/jobs.txt"
wait
for s in lucir tbbn bsce cim genifer; do echo "== $s"; tail -n 25 $R/smoke_$s.log; done > "$O/smoke.txt"
echo "smoke done at $(( $(date +%s) - START )) s" >> "$O/jobs.txt"

# (3) bench, alone on the GPU
timeout 100 python -m common.bench --steps 100 > "$O/bench.txt" 2>&1
echo "bench exit $? at $(( $(date +%s) - START )) s" >> "$O/jobs.txt"

fi

# (4) laptop runs, all at once (each a process; small models leave the GPU mostly idle)
D=gpu_data
L="--dataset tinyimagenet --data-dir $D --classes 100 --train-per-class 100 --image-size 32 --backbone resnet32
   --class-order-seed 1993 --epochs 12 --milestones 6 9 --no-amp"
CIM="--dataset tinyimagenet --data-dir $D --classes 100 --train-per-class 100 --image-size 32 --backbone resnet32a
   --class-order-seed 1993 --base-classes 50 --increment 10 --memory-total 2000 --batch-size 128 --epochs 12
   --boost-epochs 6 --compress-epochs 4 --cam-interval 3 --no-amp"
GEN="--dataset tinyimagenet --data-dir $D --classes 50 --train-per-class 100 --image-size 32 --backbone resnet32
   --class-order-seed 1993 --base-classes 25 --increment 5 --epochs 12 --milestones 4 7 10 --inc-lr 1e-3
   --g-channels 256 128 64 32 --d-width 64 --gan-epochs-first 8 --gan-epochs 14 --paired finetune lwf image-replay
   --seed 2 --no-amp"
job() { local name=$1; shift; "$@" > "$R/$name.log" 2>&1; echo "$name exit $? at $(( $(date +%s) - START )) s" >> "$O/jobs.txt"; }
T="$L --base-classes 10 --increment 10 --memory-per-class 20 --seed 2"
job tbbn2_bn python tbbn.py $T --norm bn --out-dir $R/laptop/tbbn_er/seed2/bn --resume &
job tbbn2_tbbn python tbbn.py $T --norm tbbn --out-dir $R/laptop/tbbn_er/seed2/tbbn --resume &
for s in 1 2; do for arm in foster foster_cim; do
  job cim${s}_$arm python runs/laptop/cim/seed0/arm.py $arm $CIM --paired --seed $s --out-dir $R/laptop/cim/seed$s --resume &
done; done
( G=$R/laptop/genifer/seed2
  job gen2_genifer python runs/laptop/genifer/seed0/arm.py genifer $GEN --out-dir $G --resume & GP=$!
  while [ ! -f $G/task0.pt ] && [ "$(left)" -gt 0 ] && kill -0 $GP 2>/dev/null; do sleep 3; done
  for arm in image-replay finetune lwf; do job gen2_$arm python runs/laptop/genifer/seed0/arm.py $arm $GEN --out-dir $G --resume & done
  wait ) &
job twin_lucir1 python lucir.py $L --base-classes 50 --increment 10 --memory-per-class 20 --paired ablation --seed 1 \
  --out-dir $R/twin/lucir_ablation/seed1 --resume &
while [ -n "$(jobs -r)" ] && [ "$(left)" -gt 0 ]; do sleep 5; done
pkill -TERM -f "python (tbbn|cim|lucir|genifer|runs/laptop)" ; sleep 20; pkill -KILL -f "python (tbbn|cim|lucir|genifer|runs/laptop)"
echo "runs stopped at $(( $(date +%s) - START )) s" >> "$O/jobs.txt"
# pairs of finished seeds
[ -f $R/laptop/tbbn_er/seed2/tbbn/results.json ] && [ -f $R/laptop/tbbn_er/seed2/bn/results.json ] &&
  python runs/laptop/tbbn_er/write_paired.py $R/laptop/tbbn_er/seed2 >> "$O/jobs.txt" 2>&1
for s in 1 2; do
  [ -f $R/laptop/cim/seed$s/foster/results.json ] && [ -f $R/laptop/cim/seed$s/foster_cim/results.json ] &&
    RESULTS=$R TINYIMAGENET_DIR=$D EXTRA_FLAGS=--no-amp timeout 60 bash run_all.sh --laptop --only cim --seeds $s >> "$O/jobs.txt" 2>&1
done
G=$R/laptop/genifer/seed2
ls $G/{genifer,image_replay,finetune,lwf}/results.json >/dev/null 2>&1 &&
  python runs/laptop/genifer/seed0/arm.py --write-pairs $GEN --out-dir $G >> "$O/jobs.txt" 2>&1
tar -czf "$O/results.tar.gz" --exclude='*.pt' $R
tar -cf "$O/checkpoints.tar" $(find $R -name '*.pt' -size -8M) 2>/dev/null
[ "$(stat -c %s "$O/checkpoints.tar" 2>/dev/null || echo 0)" -gt 16000000 ] && rm -f "$O/checkpoints.tar"
echo "done at $(( $(date +%s) - START )) s" >> "$O/jobs.txt"
