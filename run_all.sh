#!/usr/bin/env bash
# Reproduce every paper's headline settings, then print the paper-vs-ours table (results/summary.md).
#
#   bash run_all.sh                      # on a GPU: the real protocols; without one: every script's --smoke run
#   SEEDS="0 1 2" DATA=data IMAGENET=/path/to/imagenet bash run_all.sh
#
# CIFAR-100 is read from $DATA/cifar-100-python (torchvision downloads it there when the network allows);
# ImageNet from $IMAGENET/{train,val} (those rows are skipped when it is absent). Every run writes its own folder
# results/<method>__<dataset>_B<base>_Inc<inc>__seed<seed>[/<arm>] and --resume continues a half-run folder
# (a finished one is only re-summarised), so the script can be stopped and started again.
set -euo pipefail
cd "$(dirname "$0")"
DATA=${DATA:-data}
IMAGENET=${IMAGENET:-data/imagenet}
SEEDS=${SEEDS:-0 1 2}   # LUCIR Fig. 5 caption: mean and std over three runs
RESULTS=${RESULTS:-results}
SMOKE_FLAGS=${SMOKE_FLAGS:-}   # extra flags for the CPU smoke runs (the tests shorten them)

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no GPU visible: running every script's --smoke protocol on the CPU instead of the papers' protocols"
  python lucir.py --smoke $SMOKE_FLAGS --out-dir "$RESULTS/smoke/lucir" --resume
  python tbbn.py --smoke --paired $SMOKE_FLAGS --out-dir "$RESULTS/smoke/tbbn" --resume
  python bsce.py --smoke --paired loss $SMOKE_FLAGS --out-dir "$RESULTS/smoke/bsce" --resume
  python -m common.summary "$RESULTS/smoke"
  exit 0
fi

run() { echo "+ python $*"; python "$@"; }

for seed in $SEEDS; do
  # LUCIR, CIFAR-100 B50 (paper Fig. 5): 5 phases of 10, 10 phases of 5
  run lucir.py --data-dir "$DATA" --increment 10 --seed "$seed" --resume
  run lucir.py --data-dir "$DATA" --increment 5 --seed "$seed" --resume
  # TBBN, CIFAR-100 B0 10 tasks (official run_cifar100.sh): BN vs TBBN on the ER and SS-IL hosts
  run tbbn.py --data-dir "$DATA" --paired --seed "$seed" --resume
  run tbbn.py --data-dir "$DATA" --host ssil --paired --seed "$seed" --resume
  # BSCE, CIFAR-100 B50 (papers.md 3.5): CE vs BSCE; CE + rebalancing vs BSCE; without memory
  run bsce.py --data-dir "$DATA" --paired loss --seed "$seed" --resume
  run bsce.py --data-dir "$DATA" --paired loss --increment 5 --seed "$seed" --resume
  run bsce.py --data-dir "$DATA" --paired loss --host lucir --seed "$seed" --resume
  run bsce.py --data-dir "$DATA" --paired rebalance --seed "$seed" --resume
  run bsce.py --data-dir "$DATA" --paired memory-free --seed "$seed" --resume
  run bsce.py --data-dir "$DATA" --paired memory-free --host lucir --seed "$seed" --resume
done

if [ -d "$IMAGENET/train" ]; then
  # One seed each, as the official run scripts.
  run lucir.py --dataset imagenet100 --data-dir "$IMAGENET" --increment 10 --resume   # LUCIR Fig. 6
  run lucir.py --dataset imagenet100 --data-dir "$IMAGENET" --increment 5 --resume
  run lucir.py --dataset imagenet --data-dir "$IMAGENET" --increment 100 --resume     # B500, CBF on
  run lucir.py --dataset imagenet --data-dir "$IMAGENET" --increment 50 --resume
  run tbbn.py --dataset imagenet100 --data-dir "$IMAGENET" --paired --resume           # official run_imagenet100.sh
  run bsce.py --dataset imagenet100 --data-dir "$IMAGENET" --paired loss --resume
else
  echo "skipping the ImageNet rows: $IMAGENET/train not found (set IMAGENET=/path/to/imagenet)"
fi

python -m common.summary results
