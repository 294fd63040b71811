#!/usr/bin/env bash
# Fresh-clone CI under CPU load, RUNS times in a row (default 1):
#   scripts/ci_under_load.sh [RUNS]
# Each run clones this repository's HEAD into a new temp dir, starts two CPU-bound
# background processes (python3 -c 'while True: pass'), runs `bash .ci/run` there (bounded
# by CI_UNDER_LOAD_LIMIT_S, default 2700 s), stops the two processes, and prints the wall
# time and pytest's summary line. The hogs are killed on any exit (trap). The clone is
# deleted after its run; its log is kept (path printed). Exit status: 0 if every run passed.
set -uo pipefail

runs="${1:-1}"
limit_s="${CI_UNDER_LOAD_LIMIT_S:-2700}"
[[ "$runs" =~ ^[0-9]+$ && "$runs" -ge 1 && "$runs" -le 20 ]] || {
  echo "usage: $0 [RUNS 1-20]" >&2; exit 2; }
repo="$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)"
head="$(git -C "$repo" rev-parse HEAD)"
logs="$(mktemp -d /tmp/ci-under-load-logs.XXXXXX)"
hogs=()
work=""
cipid=""

stop_hogs() {
  for p in "${hogs[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${hogs[@]}"; do wait "$p" 2>/dev/null; done
  hogs=()
}
cleanup() {
  # timeout(1) leads its own process group: .ci/run and everything it started
  [[ -n "$cipid" ]] && kill -TERM -- "-$cipid" 2>/dev/null
  stop_hogs
  [[ -n "$work" && -d "$work" ]] && rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "ci_under_load: $runs run(s) of .ci/run on a fresh clone of $head, 2 CPU hogs, $(nproc) cores"
echo "  machine load at start: $(uptime)"
failed=0
for i in $(seq 1 "$runs"); do
  work="$(mktemp -d /tmp/ci-under-load.XXXXXX)"
  log="$logs/run$i.log"
  git clone -q "$repo" "$work/repo" && git -C "$work/repo" checkout -q "$head" || {
    echo "run $i: clone failed"; exit 1; }
  python3 -c 'while True: pass' & hogs+=($!)
  python3 -c 'while True: pass' & hogs+=($!)
  t0=$(date +%s)
  (cd "$work/repo" && exec timeout --kill-after=60 "$limit_s" bash .ci/run) >"$log" 2>&1 &
  cipid=$!
  wait "$cipid"
  rc=$?
  cipid=""
  t1=$(date +%s)
  stop_hogs
  summary="$(grep -aE '[0-9]+ (passed|failed|error)' "$log" | tail -1)"
  echo "run $i/$runs: exit $rc, wall $((t1 - t0)) s, pytest: ${summary:-<no summary>} (log $log; load $(cut -d' ' -f1-3 /proc/loadavg))"
  [[ $rc -eq 0 ]] || failed=$((failed + 1))
  rm -rf "$work"
  work=""
done
echo "ci_under_load: $((runs - failed))/$runs passed"
[[ $failed -eq 0 ]]
