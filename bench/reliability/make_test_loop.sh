#!/usr/bin/env bash
# `make test` from a fresh clone, RUNS times in a row (default 5), with a CPU-burning process beside
# it: the suite must pass every time on a loaded machine (CI runs on one).
#
#   bench/reliability/make_test_loop.sh [REPO] [RUNS]
#
# REPO defaults to this repository. A clone holds only committed files: commit first. The first
# run builds .venv (make does); FRESH=1 clones again before every run (each then builds its venv).
# Writes WORK/results.tsv (run, exit code, seconds, pytest's last line) and one log per run;
# exits 1 if any run failed.
set -u
REPO=${1:-$(git -C "$(dirname "$0")" rev-parse --show-toplevel)}
RUNS=${2:-5}
WORK=$(mktemp -d /tmp/editkit-make-test.XXXXXX)
BURNER=""
trap '[ -n "$BURNER" ] && kill "$BURNER" 2>/dev/null' EXIT

clone() {
  rm -rf "$WORK/editkit"
  git clone -q "$REPO" "$WORK/editkit"
}

clone
printf 'run\texit\tseconds\tsummary\n' > "$WORK/results.tsv"
for i in $(seq 1 "$RUNS"); do
  [ "${FRESH:-0}" = 1 ] && [ "$i" -gt 1 ] && clone
  python3 -c 'while True: pass' &
  BURNER=$!
  start=$(date +%s)
  (cd "$WORK/editkit" && make test) > "$WORK/run-$i.log" 2>&1
  rc=$?
  end=$(date +%s)
  kill "$BURNER" 2>/dev/null; wait "$BURNER" 2>/dev/null; BURNER=""
  printf '%s\t%s\t%s\t%s\n' "$i" "$rc" "$((end - start))" "$(tail -n 1 "$WORK/run-$i.log")" | tee -a "$WORK/results.tsv"
done
failed=$(awk -F'\t' 'NR > 1 && $2 != 0' "$WORK/results.tsv" | wc -l)
echo "$failed of $RUNS runs failed; logs in $WORK"
[ "$failed" -eq 0 ]
