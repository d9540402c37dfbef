#!/usr/bin/env bash
# Second call on a lent GPU machine (after experiments/gpu_session.sh): the pooling-head
# comparison of issue #12 at the new `cpu` recipe (4 heads x 5 seeds, 720 x 128), variants of
# that recipe at the same budget, and two longer reference runs; all in parallel.
#     OUT=/some/dir bash experiments/gpu_session2.sh
set -u
OUT=${OUT:-runs/gpu_session2}
R=runs/gpu_session2
mkdir -p "$OUT" "$R/heads"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
export MARKOV_ATTN_FASHION_MNIST=$PWD/.device
PY=${PY:-python3}
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
pids=()
for seed in 0 1 2 3 4; do
  for pool in cls mean map tokenrank; do
    timeout "${HEADS_S:-330}" $PY -m experiments.train --preset cpu --pool $pool --seed $seed \
      --workdir "$R/heads/${pool}_s$seed" --no-progress > "$R/heads_${pool}_s$seed.log" 2>&1 &
    pids+=($!)
  done
done
for v in ${SWEEP:-base_shift base_wide_stem base_nopn}; do
  timeout "${HEADS_S:-330}" $PY -m experiments.ablation --steps 720 --batch-size 128 \
    --variants "$v" --out "$R/sweep/$v" --no-progress > "$R/sweep_$v.log" 2>&1 &
  pids+=($!)
done
ref() {  # name, extra args
  local name=$1; shift
  timeout "${REF_S:-360}" $PY -m experiments.train --preset gpu --pool tokenrank \
    --workdir "$R/ref_$name" --no-progress "$@" > "$R/ref_$name.log" 2>&1
  $PY -c "from experiments.train import save_weights; save_weights('$R/ref_$name', '$OUT/weights_$name.npz')" >> "$R/ref_$name.log" 2>&1
}
ref stem_long --set "conv_stem=(32, 64, 128)" --set train_size=120000 --set steps=10000 --set warmup_steps=400 &
pids+=($!)
ref sstem_long --set "conv_stem=(48, 96, 192)" --set "conv_stem_downsample='stride'" --set train_size=120000 --set steps=10000 --set warmup_steps=400 &
pids+=($!)
wait "${pids[@]}"
el "training done"
grep -h '"test_acc"' "$R"/heads/*/summary.json | sort | uniq -c | head -40
for f in "$R"/heads/*/summary.json; do echo "$f $(grep '"test_acc"' $f)"; done
for v in "$R"/sweep/*/results.md; do sed -n 3p "$v"; done
for f in "$R"/ref_*/metrics.jsonl; do echo "$f"; grep '"test"' "$f" | tail -n 3; done
tar czf "$OUT/results.tgz" --exclude=checkpoints "$R"
el "packed"; ls -la "$OUT"
