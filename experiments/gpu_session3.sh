#!/usr/bin/env bash
# The next call on a lent GPU machine (prepared on the CPU, not yet run on a GPU): what the
# 2-core CPU cannot answer, in one time-boxed command (a session has 15 device minutes, one
# command at most 10):
#
#   A. the MAP head on the `clutter` level, 5 seeds at the `cpu` recipe (1,800 x 128, depth 2):
#      the pre-registered heads test (README, "The cluttered setting") ran on the CPU on
#      2026-12-07 for cls, mean, tokenrank and map (runs/heads_clutter_full, 5 seeds each):
#      this phase reruns map's five on the GPU (a check of the CPU table, not new evidence);
#   B. cls, mean, map and tokenrank x 5 seeds on the `standard` level at the full `cpu` recipe
#      (the CPU table uses the 360-step `compare` preset), one process per head, the seeds one
#      after another (never timed on a GPU: fewer seeds may finish inside TRAIN_S; the table
#      counts the finished ones);
#   C. the DiT `gpu` and `gpu_tokens` presets side by side (the label in adaLN and tokens, or in
#      the tokens only; on the CPU neither 1,200-step model read its label measurably) for as
#      many steps as the time box allows (issues #14, #15), then on each the label-use table and
#      the label-token bounce table, and the SAG evaluation on `gpu`, all time-boxed.
#
# Run from the repository root with the Fashion-MNIST .gz files in .device/ (carry it):
#
#     OUT=$OUT bash experiments/gpu_session3.sh          # on the device
#     SMOKE=1 OUT=/tmp/g3 bash experiments/gpu_session3.sh   # on the CPU: the plumbing only
#
# Every phase writes under runs/gpu_session3 and is packed into $OUT/results.tgz (checkpoints
# excluded) with the DiT's EMA weights. Afterwards, on the CPU machine: unpack into runs/ and
# regenerate the README blocks with the commands printed at the end (compare_heads aggregates
# finished runs without retraining them).
set -u
OUT=${OUT:-runs/gpu_session3}
R=runs/gpu_session3
mkdir -p "$OUT" "$R"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
[ -d "$PWD/.device" ] && export MARKOV_ATTN_FASHION_MNIST=$PWD/.device
PY=${PY:-python3}
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }
if [ -n "${SMOKE:-}" ]; then  # CPU check of the plumbing: tiny presets and budgets
  HEADS_PRESET=smoke; DIT_PRESET=smoke; DIT_TOKENS_PRESET=smoke; SEEDS="0"; DIT_STEPS=4
  TRAIN_S=300; EVAL_S=300; LU_ARGS="--n-images 20"
  SAG_ARGS="--samples 16 --steps 2 --batch 16 --classifier-steps 5"; LB_ARGS="--n-images 20"
else
  HEADS_PRESET=cpu; DIT_PRESET=gpu; DIT_TOKENS_PRESET=gpu_tokens; SEEDS=${SEEDS:-"0 1 2 3 4"}
  LU_ARGS="--n-images 1000"
  # the DiT's steps are a guess (never timed on a GPU): the time box stops it, and its last
  # checkpoint (every 1,000 steps) is what the evaluations load
  DIT_STEPS=${DIT_STEPS:-8000}; TRAIN_S=${TRAIN_S:-330}; EVAL_S=${EVAL_S:-190}
  SAG_ARGS=${SAG_ARGS:-"--samples 10000 --scales 0.25 0.5 0.75 1.0"}; LB_ARGS=""
fi
cp README.md "$R/README.gpu.md"  # the evaluations write their README blocks into this copy
for dit in dit_gpu dit_gpu_tokens; do  # blocks that the README does not have yet
  for kind in label-use label-bounce; do
    printf '\n<!-- %s-%s:start -->\n<!-- %s-%s:end -->\n' "$kind" "$dit" "$kind" "$dit" \
      >> "$R/README.gpu.md"
  done
done

el "env"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU"
$PY -c "import sys, jax, flax; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
# the double-float residuals' error-free products on this device (markov_attn/_df.py: an FMA
# contraction there could lose their error terms); seconds
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_chain.py -k "error_free or double_float" \
  2>&1 | tail -3 | tee "$R/df_check.txt"

el "A+B+C. heads (clutter: map; standard: all four) and two DiTs, in parallel, ${TRAIN_S} s"
pids=()
for level_pool in clutter:map standard:cls standard:mean standard:map standard:tokenrank; do
  level=${level_pool%%:*}; pool=${level_pool#*:}
  # shellcheck disable=SC2086
  timeout "$TRAIN_S" $PY -m experiments.compare_heads --preset $HEADS_PRESET \
    --difficulty $level --pools $pool --seeds $SEEDS --out "$R/heads_$level" --no-progress \
    > "$R/heads_${level}_$pool.log" 2>&1 &
  pids+=($!)
done
for dit in dit_gpu dit_gpu_tokens; do
  preset=$DIT_PRESET; [ "$dit" = dit_gpu_tokens ] && preset=$DIT_TOKENS_PRESET
  timeout "$TRAIN_S" $PY -m experiments.train_dit --preset "$preset" --steps "$DIT_STEPS" \
    --workdir "$R/$dit" --no-progress > "$R/$dit.log" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
el "training done"
for level in clutter standard; do
  for f in "$R/heads_$level"/*/summary.json; do echo "$f $(grep -h '"test_acc"' "$f")"; done
done
for dit in dit_gpu dit_gpu_tokens; do
  grep '"test_loss"\|"step"' "$R/$dit/metrics.jsonl" 2>/dev/null | tail -n 2
done

el "C. label use and label-token bounce on both DiTs, SAG evaluation on dit_gpu, in parallel"
pids=()
for dit in dit_gpu dit_gpu_tokens; do
  # shellcheck disable=SC2086
  timeout "$EVAL_S" $PY -m experiments.label_bounce --workdir "$R/$dit" $LB_ARGS \
    --update-readme "$R/README.gpu.md" --block "label-bounce-$dit" \
    > "$R/label_bounce_$dit.log" 2>&1 &
  pids+=($!)
  # shellcheck disable=SC2086
  timeout "$EVAL_S" $PY -m experiments.label_use --workdir "$R/$dit" $LU_ARGS \
    --update-readme "$R/README.gpu.md" --block "label-use-$dit" \
    > "$R/label_use_$dit.log" 2>&1 &
  pids+=($!)
done
# shellcheck disable=SC2086
timeout "$EVAL_S" $PY -m experiments.eval_sag --workdir "$R/dit_gpu" $SAG_ARGS \
  --classifier-dir "$R/fid_classifier" --no-progress --update-readme "$R/README.gpu.md" \
  > "$R/eval_sag.log" 2>&1 &
pids+=($!)
wait "${pids[@]}"
el "evaluations done"
tail -n 5 "$R"/label_bounce_*.log "$R"/label_use_*.log "$R/eval_sag.log"

$PY -c "
import numpy as np, jax
from flax import nnx
from experiments.train_dit import load_dit
m, _ = load_dit('$R/dit_gpu')
leaves = jax.tree_util.tree_leaves_with_path(nnx.state(m, nnx.Param))
np.savez_compressed('$OUT/dit_gpu_ema.npz',
                    **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})
" >> "$R/dit_gpu.log" 2>&1
tar czf "$OUT/results.tgz" --exclude=checkpoints "$R"
el "packed"; ls -la "$OUT"
cat <<EOF
Then, on the CPU machine (after unpacking results.tgz at the repository root):
  cp -r $R/heads_clutter/map_s* runs/heads_clutter_full/ && python -m experiments.compare_heads --preset $HEADS_PRESET --difficulty clutter --pools cls mean map tokenrank --seeds $SEEDS --out runs/heads_clutter_full --no-train --readme-block heads-clutter --update-readme
  python -m experiments.compare_heads --preset $HEADS_PRESET --difficulty standard --pools cls mean map tokenrank --seeds $SEEDS --out $R/heads_standard --no-train --readme-block heads-gpu-standard --update-readme
  (a new block: add its markers to the README first)
  the label-use, label-bounce and sag-eval blocks of the GPU DiTs: in $R/README.gpu.md (copy
  them over; the label-use-dit_gpu* and label-bounce-dit_gpu* blocks are new: the script added
  their markers to its copy, add them to the README where the tables belong)
EOF
