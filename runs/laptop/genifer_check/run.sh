HERE=$(cd "$(dirname "$0")" && pwd)
cd "$WORKTREE"  # a checkout with data/ and results/laptop/genifer/seed0/task0.pt
export OMP_NUM_THREADS=1
python "$HERE"/genlr.py lr1e-3 
python "$HERE"/genlr.py lr1e-2 --inc-lr 1e-2
python "$HERE"/genlr.py ft_lr1e-3 --arm finetune
python "$HERE"/genlr.py lr3e-3 --inc-lr 3e-3
python "$HERE"/genlr.py lr1e-3_ce1 --ce-weight 1.0 --kd-weight 1.0
cd "$WORKTREE"  # a checkout with data/ and results/laptop/genifer/seed0/task0.pt
export OMP_NUM_THREADS=1
for v in "ce1kd0 --ce-weight 1 --kd-weight 0" "ce1feat0 --ce-weight 1 --feat-weight 0" "ce1kd0feat0 --ce-weight 1 --kd-weight 0 --feat-weight 0" "ft3 --arm finetune"; do
  set -- $v; tag=$1; shift
  python "$HERE"/genlr.py e3_$tag --epochs 3 --milestones 3 "$@"
done
