#!/usr/bin/env bash
# The test suite compiled on a GPU machine, in parallel shards that fit one device call.
#
#   PART=1/3 SHARDS=6 LIMIT=540 OUT=/tmp/out bash scripts/gpu_tests.sh [pytest paths or ids...]
#   IDS=left.ids SHARDS=6 LIMIT=540 OUT=/tmp/out bash scripts/gpu_tests.sh
#
# Collects the test ids (all of tests/ by default, or the ids listed one a line in the file
# IDS), keeps part PART (k/n: every n-th id from the k-th, so each part mixes all files), deals
# them round-robin to SHARDS pytest processes that share the GPU (each may take 0.9/SHARDS of
# its memory) and stops them after LIMIT seconds. Each shard logs one line a test, so a stopped
# shard still says which tests passed and failed. $OUT gets three files, few enough to come
# back from a device call: summary.txt (each shard's counts, then every failed or errored
# test), left.ids (the tests that no shard finished: the next call's IDS) and logs.tgz (each
# shard's log, with the failures' tracebacks and a finished shard's 20 slowest tests).
set -u
PART=${PART:-1/1} SHARDS=${SHARDS:-6} LIMIT=${LIMIT:-540} OUT=${OUT:?set OUT to a folder}
k=${PART%/*} n=${PART#*/}
mkdir -p "$OUT"
work=$(mktemp -d)
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_PYTHON_CLIENT_MEM_FRACTION=$(python3 -c "print(round(0.9 / $SHARDS, 3))")
if [ -n "${IDS:-}" ]; then
  cp "$IDS" "$work/collected"
else
  python3 -m pytest --collect-only -q -p no:cacheprovider "${@:-tests}" > "$work/collected" 2>&1
fi
grep '::' "$work/collected" | awk -v k="$k" -v n="$n" '(NR - k) % n == 0' > "$work/ids"
if [ ! -s "$work/ids" ]; then  # pytest given no ids would run all of tests/ in every shard
  echo "part $PART of ${IDS:-${*:-tests}} holds no test; its collection ends:" >&2
  tail -5 "$work/collected" >&2
  exit 2
fi
echo "part $PART: $(wc -l < "$work/ids") tests in $SHARDS shards, $LIMIT s"
for i in $(seq 0 $((SHARDS - 1))); do
  awk -v i="$i" -v s="$SHARDS" '(NR - 1) % s == i' "$work/ids" > "$work/shard_$i.ids"
  [ -s "$work/shard_$i.ids" ] || continue  # more shards than tests
  (mapfile -t ids < "$work/shard_$i.ids"  # one id a line: ids may hold spaces
   timeout "$LIMIT" python3 -m pytest -v -p no:cacheprovider --no-header -rfE --durations=20 \
     "${ids[@]}" > "$work/shard_$i.log" 2>&1
   rc=$?
   counts=$(grep -oE ' (PASSED|FAILED|SKIPPED|ERROR)' "$work/shard_$i.log" | sort | uniq -c \
            | awk '{printf "%s %s, ", $2, $1}')
   echo "shard $i rc=$rc of $(wc -l < "$work/shard_$i.ids"): $counts" >> "$work/counts") &
done
wait
# A test's -v line: its id, then its outcome (a failure's teardown error may add a second line).
cat "$work"/shard_*.log | grep -oE '^tests/.+ (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)' \
  | sed -E 's/ [A-Z]+$//' | sort -u > "$work/finished"
sort "$work/ids" | comm -23 - "$work/finished" > "$OUT/left.ids"
{ sort "$work/counts"
  echo "left: $(wc -l < "$OUT/left.ids") of $(wc -l < "$work/ids") tests not finished"
  grep -h -E ' (FAILED|ERROR)' "$work"/shard_*.log | grep '::' | sort -u; } > "$OUT/summary.txt"
tar czf "$OUT/logs.tgz" -C "$work" $(cd "$work" && ls shard_*.log)
cat "$OUT/summary.txt"
rm -rf "$work"
