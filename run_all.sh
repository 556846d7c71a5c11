#!/usr/bin/env bash
# Reproduce every paper's headline settings, then print the paper-vs-ours table (results/summary.md).
#
#   bash run_all.sh                      # on a GPU: the real protocols; without one: every script's --smoke run
#   SEEDS="0 1 2" DATA=data bash run_all.sh
#
# Datasets are read from $DATA (default: data/): CIFAR-100 as data/cifar-100-python (downloaded by torchvision
# when the network allows), ImageNet as $IMAGENET/{train,val} (rows skipped when absent). Each command writes its
# own folder under results/ and resumes it if it was interrupted (--resume continues a finished or half-run folder).
set -euo pipefail
cd "$(dirname "$0")"
DATA=${DATA:-data}
IMAGENET=${IMAGENET:-data/imagenet}
SEEDS=${SEEDS:-0 1 2}   # LUCIR Fig. 5 caption: mean and std over three runs
RESULTS=${RESULTS:-results}

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no GPU visible: running every script's --smoke protocol on the CPU instead of the papers' protocols"
  for script in lucir.py tbbn.py bsce.py; do
    python "$script" --smoke --out-dir "$RESULTS/smoke/${script%.py}" --resume
  done
  python -m common.summary "$RESULTS/smoke"
  exit 0
fi

# Each run writes $RESULTS/<script>__<dataset>_B<base>_Inc<inc>__seed<seed>.
run() { local script=$1; shift; echo "+ python $script $*"; python "$script" "$@"; }

for seed in $SEEDS; do
  # LUCIR, CIFAR-100 B50 (paper Fig. 5): 5 phases of 10, 10 phases of 5
  run lucir.py --data-dir "$DATA" --increment 10 --seed "$seed" --resume
  run lucir.py --data-dir "$DATA" --increment 5 --seed "$seed" --resume
done

if [ -d "$IMAGENET/train" ]; then
  # LUCIR, ImageNet-Subset B50 and ImageNet-Full B500 (paper Fig. 6); one seed, as the official run.sh
  run lucir.py --dataset imagenet100 --data-dir "$IMAGENET" --increment 10 --resume
  run lucir.py --dataset imagenet100 --data-dir "$IMAGENET" --increment 5 --resume
  run lucir.py --dataset imagenet --data-dir "$IMAGENET" --increment 100 --resume
  run lucir.py --dataset imagenet --data-dir "$IMAGENET" --increment 50 --resume
else
  echo "skipping the ImageNet rows: $IMAGENET/train not found (set IMAGENET=/path/to/imagenet)"
fi

python -m common.summary results
