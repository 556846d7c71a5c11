#!/usr/bin/env bash
# Reproduce the headline settings of all five papers, plus a Tiny-ImageNet-200 row for every script, then write
# results/SUMMARY.md (python -m common.summary: paper vs ours, paired claims with 95% CIs, plots).
#
#   bash run_all.sh                        # on a GPU: the papers' protocols; without one: the --smoke runs below
#   bash run_all.sh --only lucir,tbbn      # some scripts only (lucir, tbbn, bsce, cim, genifer)
#   bash run_all.sh --smoke                # every script's smoke protocol (paired where it has pairs), CPU minutes
#   bash run_all.sh --full                 # the papers' protocols even without a GPU
#   bash run_all.sh --laptop               # the laptop protocol on a CPU (README: Tiny-ImageNet, 100 classes x 100
#                                          # images, 32 px): every claim's pair, seeds 0 1 2, into <results>/laptop
#   OMP_NUM_THREADS=1 bash run_all.sh --laptop --seeds 0 & OMP_NUM_THREADS=1 bash run_all.sh --laptop --seeds 1 &
#                                          # two jobs at a time on a 2-core machine (one core each)
#   bash run_all.sh --seeds "0 1 2" --cifar data --imagenet /data/imagenet
#
# Data roots: a flag, else an environment variable, else the default.
#   --cifar DIR     CIFAR100_DIR      DIR/cifar-100-python/{train,test,meta}   (default: data; downloaded when
#                                     the network allows)
#   --tiny DIR      TINYIMAGENET_DIR  DIR/tiny-imagenet-200/                   (default: data; unpack the archives
#                                     of ../shared/data/tiny-imagenet-200 there, see README "Datasets")
#   --food DIR      FOOD101_DIR       DIR/food-101/{images,meta}               (default: data)
#   --imagenet DIR  IMAGENET_DIR      DIR/{train,val}/<wnid>/*.JPEG            (default: data/imagenet; ImageNet-100
#                                     is drawn from it)
# Other settings: --seeds / SEEDS (default "0 1 2": LUCIR Fig. 5 averages three runs), --large-seeds /
# LARGE_SEEDS for the ImageNet and Food-101 rows (default: the first seed), --results / RESULTS (default
# results), SMOKE_FLAGS / EXTRA_FLAGS (extra flags for every smoke / protocol run, appended; the tests use them).
#
# A row whose dataset is missing is skipped with one line (what to download, where to put it); a script not
# in this checkout is skipped with one line. Every row writes its own folder <results>/<setting>__seed<N>; a
# finished one (results.json, or paired.json for a pair) is only re-summarised, an interrupted one continues
# (--resume: mid-phase checkpoints). Exit code: 0 when every row ran, 1 when a row was skipped or failed, 130 /
# 143 when stopped by Ctrl-C / SIGTERM (the running script checkpoints first; run the same command again).
set -uo pipefail
cd "$(dirname "$0")"

ONLY="lucir,tbbn,bsce,cim,genifer"
SMOKE=""
FULL=""
LAPTOP=""
SEEDS=${SEEDS:-0 1 2}
LARGE_SEEDS=${LARGE_SEEDS:-}
RESULTS=${RESULTS:-results}
CIFAR100_DIR=${CIFAR100_DIR:-data}
TINYIMAGENET_DIR=${TINYIMAGENET_DIR:-data}
FOOD101_DIR=${FOOD101_DIR:-data}
IMAGENET_DIR=${IMAGENET_DIR:-data/imagenet}
SMOKE_FLAGS=${SMOKE_FLAGS:-}
EXTRA_FLAGS=${EXTRA_FLAGS:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --only) ONLY="$2"; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    --full) FULL=1; shift ;;
    --laptop) LAPTOP=1; shift ;;
    --seeds) SEEDS="$2"; shift 2 ;;
    --large-seeds) LARGE_SEEDS="$2"; shift 2 ;;
    --results) RESULTS="$2"; shift 2 ;;
    --cifar) CIFAR100_DIR="$2"; shift 2 ;;
    --tiny) TINYIMAGENET_DIR="$2"; shift 2 ;;
    --food) FOOD101_DIR="$2"; shift 2 ;;
    --imagenet) IMAGENET_DIR="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (see bash run_all.sh --help)" >&2; exit 2 ;;
  esac
done
LARGE_SEEDS=${LARGE_SEEDS:-${SEEDS%% *}}
for name in ${ONLY//,/ }; do
  case "$name" in
    lucir|tbbn|bsce|cim|genifer) ;;
    *) echo "error: --only $name: not one of lucir,tbbn,bsce,cim,genifer" >&2; exit 2 ;;
  esac
done

ran=0; skipped=0; failed=0
declare -A said

# row SCRIPT DATASET FOLDER [flags...]: one run (or pair) into $RESULTS/FOLDER, unless skipped or already finished.
row() {
  local script=$1 dataset=$2 folder=$3; shift 3
  case ",$ONLY," in *",$script,"*) ;; *) return ;; esac
  if [ ! -f "$script.py" ]; then
    [ -z "${said[$script]:-}" ] && echo "skip: $script.py not in this checkout (its rows: none run)"
    said[$script]=1; skipped=$((skipped + 1)); return
  fi
  local why
  if ! why=$(missing "$dataset"); then
    echo "skip $folder: $why"; skipped=$((skipped + 1)); return
  fi
  local out="$RESULTS/$folder"
  if [ -f "$out/paired.json" ] || all_pairs_written "$out" "$@" ||
     { [ -f "$out/results.json" ] && [[ " $* " != *" --paired"* ]]; }; then
    echo "done $folder (finished earlier; only re-summarised)"; ran=$((ran + 1)); return
  fi
  local extra=$EXTRA_FLAGS
  [ "$dataset" = synthetic ] && extra=""
  echo "+ python $script.py $* $extra --out-dir $out --resume"
  python "$script.py" "$@" $extra --out-dir "$out" --resume
  local rc=$?
  if [ $rc -eq 130 ] || [ $rc -eq 143 ]; then
    echo "stopped (exit $rc): the run checkpointed; run the same run_all.sh command again to continue" >&2
    exit $rc
  fi
  if [ $rc -eq 0 ]; then ran=$((ran + 1)); else echo "FAILED $folder (exit $rc)" >&2; failed=$((failed + 1)); fi
}

# all_pairs_written OUT FLAGS...: genifer.py writes one OUT/pair_<name>/paired.json per name after --paired, all at
# the end of the run (bare --paired: every pair), so the row is finished when each named one (or any, if bare) exists.
all_pairs_written() {
  local out=$1 after=0 names=() name; shift
  for a in "$@"; do
    if [ $after = 1 ]; then [[ $a == -* ]] && after=2 || names+=("$a"); fi
    [ "$a" = --paired ] && after=1
  done
  [ $after = 0 ] && return 1
  [ ${#names[@]} -eq 0 ] && { compgen -G "$out/pair_*/paired.json" >/dev/null; return; }
  for name in "${names[@]}"; do [ -f "$out/pair_$name/paired.json" ] || return 1; done
}

# missing DATASET: prints what to download and where (and returns 1) when the dataset is not there.
missing() {
  case "$1" in
    synthetic) return 0 ;;
    cifar100)
      [ -f "$CIFAR100_DIR/cifar-100-python/train" ] && return 0
      python -c "import socket, sys, torchvision; socket.setdefaulttimeout(20)
torchvision.datasets.CIFAR100(sys.argv[1], download=True)" "$CIFAR100_DIR" >/dev/null 2>&1
      [ -f "$CIFAR100_DIR/cifar-100-python/train" ] && return 0
      echo "CIFAR-100 not found: download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz and unpack it" \
        "in $CIFAR100_DIR/ (--cifar DIR)" ;;
    tinyimagenet)
      [ -f "$TINYIMAGENET_DIR/tiny-imagenet-200/wnids.txt" ] && return 0
      echo "Tiny-ImageNet-200 not found: unpack ../shared/data/tiny-imagenet-200/*.tar.gz (or" \
        "http://cs231n.stanford.edu/tiny-imagenet-200.zip) into $TINYIMAGENET_DIR/ (--tiny DIR)" ;;
    food101)
      [ -f "$FOOD101_DIR/food-101/meta/train.txt" ] && return 0
      echo "Food-101 not found: download http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz and unpack it in" \
        "$FOOD101_DIR/ (--food DIR)" ;;
    imagenet|imagenet100)
      [ -d "$IMAGENET_DIR/train" ] && [ -d "$IMAGENET_DIR/val" ] && return 0
      echo "ImageNet not found: put ILSVRC-2012 train/ and val/ as <wnid>/*.JPEG class folders in" \
        "$IMAGENET_DIR/ (--imagenet DIR; https://image-net.org)" ;;
  esac
  return 1
}

has_gpu() { python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; }
if [ -z "$SMOKE" ] && [ -z "$FULL" ] && [ -z "$LAPTOP" ] && ! has_gpu; then
  echo "no GPU visible: running every script's --smoke protocol on the CPU instead of the papers' protocols"
  SMOKE=1
fi

if [ -n "$LAPTOP" ]; then
  # The laptop protocol (README "CPU-scale evidence"): claims in sign on real images in CPU hours, not the papers'
  # numbers. Folders laptop/<claim>/seed<N>[/<arm>], as kept under runs/laptop (the README table's source).
  SUMMARY_ROOT="$RESULTS/laptop"
  L="--dataset tinyimagenet --data-dir $TINYIMAGENET_DIR --classes 100 --train-per-class 100 --image-size 32
     --backbone resnet32 --class-order-seed 1993 --epochs 12 --milestones 6 9"
  B50="--base-classes 50 --increment 10 --memory-per-class 20"
  for s in $SEEDS; do
    # LUCIR's ablation ladder (paper Fig. 7(a)): CN, CN + LC, CN + LC + IS, one shared base phase
    row lucir tinyimagenet "laptop/lucir_ablation/seed$s" $L $B50 --paired ablation --seed "$s"
    # TBBN vs BN on the ER host, its B0 protocol: 10 tasks of 10
    row tbbn tinyimagenet "laptop/tbbn_er/seed$s" $L --base-classes 10 --increment 10 --memory-per-class 20 \
      --paired bn tbbn --seed "$s"
    # BSCE: CE vs BSCE (iCaRL host), and the memory-free pair (CE + KD vs BSCE + KD, no exemplars)
    row bsce tinyimagenet "laptop/bsce_loss/seed$s" $L $B50 --paired loss --seed "$s"
    row bsce tinyimagenet "laptop/bsce_memfree/seed$s" $L $B50 --memory-per-class 0 --paired memory-free --seed "$s"
    # CIM: FOSTER vs FOSTER w/ CIM on the official host's ResNet-32 (option-A shortcuts), fixed memory 2000, cosine
    # lr (official); base 12 epochs, boosting 6, compression 4, CAMs every 3 epochs (officially 40 of 200 / 170)
    row cim tinyimagenet "laptop/cim/seed$s" --dataset tinyimagenet --data-dir "$TINYIMAGENET_DIR" --classes 100 \
      --train-per-class 100 --image-size 32 --backbone resnet32a --class-order-seed 1993 --base-classes 50 \
      --increment 10 --memory-total 2000 --batch-size 128 --epochs 12 --boost-epochs 6 --compress-epochs 4 \
      --cam-interval 3 --paired --seed "$s"
    # Genifer's reduced protocol (README "Genifer on the laptop"): 50 classes, B25 then 5 tasks of 5, 12 epochs (x0.2
    # at 4 7 10), RAdam lr 1e-3 after task 0, G at half the official widths, D <= 64 channels, 8 GAN epochs after
    # task 0 and 14 after the others; Genifer vs fine-tuning, LwF and image replay (pair_<pair>/paired.json)
    row genifer tinyimagenet "laptop/genifer/seed$s" --dataset tinyimagenet --data-dir "$TINYIMAGENET_DIR" \
      --classes 50 --train-per-class 100 --image-size 32 --backbone resnet32 --class-order-seed 1993 \
      --base-classes 25 --increment 5 --epochs 12 --milestones 4 7 10 --inc-lr 1e-3 --g-channels 256 128 64 32 \
      --d-width 64 --gan-epochs-first 8 --gan-epochs 14 --paired finetune lwf image-replay --seed "$s"
  done
elif [ -n "$SMOKE" ]; then
  SUMMARY_ROOT="$RESULTS/smoke"
  RESULTS="$RESULTS/smoke"
  row lucir synthetic lucir --smoke $SMOKE_FLAGS
  row tbbn synthetic tbbn --smoke --paired $SMOKE_FLAGS
  row bsce synthetic bsce --smoke --paired loss $SMOKE_FLAGS
  row cim synthetic cim --smoke --paired $SMOKE_FLAGS
  row genifer synthetic genifer --smoke --paired $SMOKE_FLAGS
else
  SUMMARY_ROOT="$RESULTS"
  C="--data-dir $CIFAR100_DIR"; T="--dataset tinyimagenet --data-dir $TINYIMAGENET_DIR"
  F="--dataset food101 --data-dir $FOOD101_DIR"; I="--data-dir $IMAGENET_DIR"
  for s in $SEEDS; do
    # LUCIR, CIFAR-100 B50 (paper Fig. 5): 5 phases of 10, 10 phases of 5
    row lucir cifar100 "lucir__cifar100_B50_Inc10__seed$s" $C --seed "$s"
    row lucir cifar100 "lucir__cifar100_B50_Inc5__seed$s" $C --increment 5 --seed "$s"
    # TBBN, CIFAR-100 B0 10 tasks (official run_cifar100.sh): BN vs TBBN on the ER and SS-IL hosts
    row tbbn cifar100 "tbbn-er-paired__cifar100_B10_Inc10__seed$s" $C --paired --seed "$s"
    row tbbn cifar100 "tbbn-ssil-paired__cifar100_B10_Inc10__seed$s" $C --host ssil --paired --seed "$s"
    # BSCE, CIFAR-100 B50 (papers.md 3.5): CE vs BSCE; CE + rebalancing vs BSCE; without memory
    row bsce cifar100 "bsce-paired-loss-icarl__cifar100_B50_Inc10__seed$s" $C --paired loss --seed "$s"
    row bsce cifar100 "bsce-paired-loss-icarl__cifar100_B50_Inc5__seed$s" $C --paired loss --increment 5 --seed "$s"
    row bsce cifar100 "bsce-paired-loss-lucir__cifar100_B50_Inc10__seed$s" $C --paired loss --host lucir --seed "$s"
    row bsce cifar100 "bsce-paired-rebalance-icarl__cifar100_B50_Inc10__seed$s" $C --paired rebalance --seed "$s"
    row bsce cifar100 "bsce-paired-memory-free-icarl__cifar100_B50_Inc10__seed$s" $C --paired memory-free --seed "$s"
    row bsce cifar100 "bsce-paired-memory-free-lucir__cifar100_B50_Inc10__seed$s" $C --paired memory-free --host lucir \
      --seed "$s"
    # Genifer, CIFAR-100 B50, 5 tasks (official config/examples): Genifer vs fine-tuning, LwF, image replay, and
    # without ADA / without replay augmentation (each pair: <folder>/pair_<pair>/paired.json)
    row genifer cifar100 "genifer-paired__cifar100_B50_Inc10__seed$s" $C --paired --seed "$s"
    # Tiny-ImageNet-200 (not in the papers; each script's tinyimagenet defaults)
    row lucir tinyimagenet "lucir__tinyimagenet__seed$s" $T --seed "$s"
    row tbbn tinyimagenet "tbbn-er-paired__tinyimagenet__seed$s" $T --paired --seed "$s"
    row bsce tinyimagenet "bsce-paired-loss-icarl__tinyimagenet__seed$s" $T --paired loss --seed "$s"
    row cim tinyimagenet "cim-paired__tinyimagenet__seed$s" $T --paired --seed "$s"
    row genifer tinyimagenet "genifer-paired__tinyimagenet__seed$s" $T --paired --seed "$s"
  done
  for s in $LARGE_SEEDS; do
    # LUCIR Fig. 6: ImageNet-Subset B50 and ImageNet-Full B500 (CBF on), 5 and 10 phases
    row lucir imagenet100 "lucir__imagenet100_B50_Inc10__seed$s" --dataset imagenet100 $I --seed "$s"
    row lucir imagenet100 "lucir__imagenet100_B50_Inc5__seed$s" --dataset imagenet100 $I --increment 5 --seed "$s"
    row lucir imagenet "lucir__imagenet_B500_Inc100__seed$s" --dataset imagenet $I --seed "$s"
    row lucir imagenet "lucir__imagenet_B500_Inc50__seed$s" --dataset imagenet $I --increment 50 --seed "$s"
    # TBBN ImageNet-100 (official run_imagenet100.sh); BSCE ImageNet-Subset (papers.md 3.5)
    row tbbn imagenet100 "tbbn-er-paired__imagenet100_B10_Inc10__seed$s" --dataset imagenet100 $I --paired --seed "$s"
    row bsce imagenet100 "bsce-paired-loss-icarl__imagenet100_B50_Inc10__seed$s" --dataset imagenet100 $I \
      --paired loss --seed "$s"
    # CIM (papers.md 4.2, 4.3): FOSTER vs FOSTER w/ CIM; Food-101 10 phases, ImageNet-100 10 phases,
    # ImageNet-1000 B100 10 phases with M = 20k and 5k (the abstract's +4.8 points)
    row cim food101 "cim-paired__food101__seed$s" $F --paired --seed "$s"
    row cim imagenet100 "cim-paired__imagenet100__seed$s" --dataset imagenet100 $I --paired --seed "$s"
    row cim imagenet "cim-paired__imagenet_M20000__seed$s" --dataset imagenet $I --paired --seed "$s"
    row cim imagenet "cim-paired__imagenet_M5000__seed$s" --dataset imagenet $I --paired --memory-total 5000 --seed "$s"
  done
fi

python -m common.summary "$SUMMARY_ROOT" >/dev/null && echo "summary: $SUMMARY_ROOT/SUMMARY.md"
echo "rows: $ran ran, $skipped skipped, $failed failed"
[ $skipped -eq 0 ] && [ $failed -eq 0 ]
