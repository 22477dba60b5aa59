#!/usr/bin/env bash
# The test suite compiled on a GPU machine, in parallel shards that fit one device call.
#
#   PART=1/3 SHARDS=6 LIMIT=540 OUT=/tmp/out bash scripts/gpu_tests.sh [pytest paths...]
#
# Collects the test ids (all of tests/ by default), keeps part PART (k/n: every n-th id from
# the k-th, so each part mixes all files), deals them round-robin to SHARDS pytest processes
# that share the GPU (each may take 0.9/SHARDS of its memory) and stops them after LIMIT
# seconds. Each shard logs one line a test to $OUT/shard_<i>.log, so a stopped shard still
# says which tests passed and failed (a finished one also lists its 20 slowest tests);
# $OUT/summary.txt has each shard's counts.
set -u
PART=${PART:-1/1} SHARDS=${SHARDS:-6} LIMIT=${LIMIT:-540} OUT=${OUT:?set OUT to a folder}
k=${PART%/*} n=${PART#*/}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_PYTHON_CLIENT_MEM_FRACTION=$(python3 -c "print(round(0.9 / $SHARDS, 3))")
python3 -m pytest --collect-only -q -p no:cacheprovider "${@:-tests}" 2>/dev/null \
  | grep '::' | awk -v k="$k" -v n="$n" '(NR - k) % n == 0' > "$OUT/ids.txt"
echo "part $PART: $(wc -l < "$OUT/ids.txt") tests in $SHARDS shards, $LIMIT s"
for i in $(seq 0 $((SHARDS - 1))); do
  awk -v i="$i" -v s="$SHARDS" '(NR - 1) % s == i' "$OUT/ids.txt" > "$OUT/shard_$i.ids"
  (mapfile -t ids < "$OUT/shard_$i.ids"  # one id a line: ids may hold spaces
   timeout "$LIMIT" python3 -m pytest -v -p no:cacheprovider --no-header -rfE --durations=20 \
     "${ids[@]}" > "$OUT/shard_$i.log" 2>&1
   rc=$?
   counts=$(grep -oE ' (PASSED|FAILED|SKIPPED|ERROR)' "$OUT/shard_$i.log" | sort | uniq -c \
            | awk '{printf "%s %s, ", $2, $1}')
   echo "shard $i rc=$rc of $(wc -l < "$OUT/shard_$i.ids"): $counts" >> "$OUT/summary.txt") &
done
wait
sort "$OUT/summary.txt"
grep -h -E ' (FAILED|ERROR)' "$OUT"/shard_*.log | grep '::' | sort -u
