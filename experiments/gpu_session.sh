#!/usr/bin/env bash
# One call on a lent GPU machine (see the README, "Accelerator runs"): the accelerator
# benchmark, a recipe sweep of the `make demo` model at its CPU budget (720 x 128), and the
# reference models (`gpu` preset and two variants), all in one command so that the machine is
# started once. Run from the repository root with the Fashion-MNIST .gz files in .device/:
#
#     OUT=/some/dir bash experiments/gpu_session.sh
#
# Uses the machine's own python3/jax (no install; PYTHONPATH=.). Every phase is time-boxed and
# everything it wrote is packed into $OUT at the end (results.tgz, weights_*.npz, logs).
set -u
OUT=${OUT:-runs/gpu_session}
R=runs/gpu_session
mkdir -p "$OUT" "$R"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
export MARKOV_ATTN_FASHION_MNIST=$PWD/.device
PY=${PY:-python3}
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

el "env"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import sys, jax, flax, optax, orbax.checkpoint as o; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"

el "1. bench_gpu"
timeout "${BENCH_S:-170}" $PY -m experiments.bench_gpu --repeats 2 --out "$R/bench" > "$R/bench.log" 2>&1
el "bench rc=$?"; tail -n 30 "$R/bench.log"

el "2. recipe sweep at the demo budget + reference models, in parallel"
SWEEP=${SWEEP:-old shift shift_ls lr2 deep fresh fresh_shift_ls stem stem_shift_ls stem_fresh}
pids=()
for v in $SWEEP; do
  timeout "${SWEEP_S:-230}" $PY -m experiments.ablation --steps 720 --batch-size 128 \
    --variants "$v" --out "$R/sweep/$v" --no-progress > "$R/sweep_$v.log" 2>&1 &
  pids+=($!)
done
ref() {  # name, extra args
  local name=$1; shift
  timeout "${REF_S:-280}" $PY -m experiments.train --preset gpu --pool tokenrank \
    --workdir "$R/ref_$name" --no-progress "$@" > "$R/ref_$name.log" 2>&1
  $PY -c "from experiments.train import save_weights; save_weights('$R/ref_$name', '$OUT/weights_$name.npz')" >> "$R/ref_$name.log" 2>&1
}
ref gpu & pids+=($!)
ref stem --set "conv_stem=(32, 64, 128)" & pids+=($!)
ref small --set width=96 --set depth=4 --set num_heads=4 --set mlp_dim=384 & pids+=($!)
wait "${pids[@]}"
el "training done"
for v in $SWEEP; do tail -n 3 "$R/sweep/$v/results.md" 2>/dev/null | head -1 || true; grep -h '"test_acc"' "$R/sweep/$v"/*/summary.json 2>/dev/null | head -1; done
for f in "$R"/ref_*/metrics.jsonl; do echo "$f"; grep '"test"' "$f" | tail -n 2; done
tar czf "$OUT/results.tgz" --exclude=checkpoints "$R"
cp "$R/bench.log" "$OUT/" 2>/dev/null
el "packed"; ls -la "$OUT"
