#!/usr/bin/env bash
# shardckpt demo: train on 2 ranks, SIGKILL one rank mid-run, resume on 3 ranks, then on 1.
# The loss continues from the last committed checkpoint each time. CPU only (gloo); about a minute.
#   bash launch/demo.sh [workdir]
set -u
cd "$(dirname "$0")/.."
WORK="${1:-$(mktemp -d /tmp/shardckpt-demo.XXXXXX)}"
CKPT="$WORK/ckpt"
rm -rf "$CKPT" "$WORK/pids"
mkdir -p "$WORK"
export OMP_NUM_THREADS=1
PY="${PYTHON:-python3}"   # the interpreter shardckpt was installed into (scripts/dev.sh demo does that)
ARGS=(--ckpt "$CKPT" --steps 60 --save-every 5 --keep-last 3 --pid-dir "$WORK/pids")
TORCHRUN=("$PY" -m torch.distributed.run --standalone --max-restarts=0)
echo "== shardckpt backend: $("$PY" -c 'import shardckpt; print(shardckpt.backend)')"

committed() { ls -d "$CKPT"/step-*/manifest.json 2>/dev/null | sed 's#.*/step-0*\([0-9]*\)/manifest.json#\1#' | sort -n | tr '\n' ' '; }

echo "== phase 1: 2 ranks; rank 1 gets SIGKILL once two checkpoints have committed"
"${TORCHRUN[@]}" --nproc_per_node=2 launch/train.py "${ARGS[@]}" --step-sleep 0.05 >"$WORK/phase1.log" 2>&1 &
RUN=$!
for _ in $(seq 600); do
  [ -f "$CKPT/step-0000000010/manifest.json" ] && break
  kill -0 $RUN 2>/dev/null || break
  sleep 0.1
done
if [ -f "$WORK/pids/rank1.pid" ] && kill -0 $RUN 2>/dev/null; then
  VICTIM=$(cat "$WORK/pids/rank1.pid")
  kill -KILL "$VICTIM" && echo "   killed rank 1 (pid $VICTIM) with SIGKILL"
fi
wait $RUN
echo "   torchrun exited with status $? (expected: the job lost a rank)"
grep -E '^(starting|step)' "$WORK/phase1.log" | tail -4 | sed 's/^/   /'
echo "   committed checkpoints: $(committed)(anything later was never committed)"

echo "== phase 2: resume on 3 ranks"
"${TORCHRUN[@]}" --nproc_per_node=3 launch/train.py "${ARGS[@]}" --stop-at 20 >"$WORK/phase2.log" 2>&1
echo "   exit status $?"
grep -E '^(resumed|starting|step|done)|WARNING' "$WORK/phase2.log" | sed -n '1,4p;$p' | sed 's/^/   /'

echo "== phase 3: resume on 1 rank"
"${TORCHRUN[@]}" --nproc_per_node=1 launch/train.py "${ARGS[@]}" --stop-at 25 >"$WORK/phase3.log" 2>&1
echo "   exit status $?"
grep -E '^(resumed|starting|step|done)|WARNING' "$WORK/phase3.log" | sed -n '1,4p;$p' | sed 's/^/   /'
echo "== logs and checkpoints in $WORK"
