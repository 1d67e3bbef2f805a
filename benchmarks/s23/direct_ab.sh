#!/usr/bin/env bash
# Session 23: the O_DIRECT prototype beside llm-prune's export and cp -r, 32 blocks, alternating.
#   bash direct_ab.sh CKPT ROUNDS
set -u
CKPT=$1; ROUNDS=${2:-2}; HERE=$(cd "$(dirname "$0")" && pwd)
run() {  # label, command...
  local label=$1; shift
  rm -rf /tmp/ab-out; sync; sleep 3
  local t0=$(date +%s.%N); "$@" > /dev/null 2>&1; local rc=$?; local t1=$(date +%s.%N)
  echo "$label $(echo "$t1 - $t0" | bc) s rc=$rc"
}
python -m llm_prune "$CKPT" --sparsity 0.5 --out /tmp/ab-out --quiet > /dev/null 2>&1  # source hashes cached
for r in $(seq "$ROUNDS"); do
  run llm-prune python -m llm_prune "$CKPT" --sparsity 0.5 --out /tmp/ab-out --quiet
  run direct python "$HERE/direct_export.py" "$CKPT" /tmp/ab-out
  run buffered python "$HERE/direct_export.py" "$CKPT" /tmp/ab-out --buffered
  run direct-overlap python "$HERE/direct_export.py" "$CKPT" /tmp/ab-out --overlap
  run cp cp -r "$CKPT" /tmp/ab-out
done
rm -rf /tmp/ab-out
