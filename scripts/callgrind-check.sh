#!/usr/bin/env bash
# The suite's regression check on the request path's cost: instructions
# per null-co request (QD32, 4 KiB random reads, one queue, release build)
# counted by callgrind (scripts/callgrind-null.sh), against the baseline
# recorded in docs/PERFORMANCE.md ("Regression check: instructions per
# request"). Fails when the count grew by more than 10 %; says so when it
# fell by more than 10 % (then lower the baseline in the docs with the
# change that earned it). Instruction counts do not depend on the
# machine's speed or load the way timings do; the run-to-run spread is
# about 4 % on a quiet machine (batching under callgrind varies a little),
# up to 10 % on a busy one, upwards: the lower of two measurements counts.
#   usage: scripts/callgrind-check.sh [short-seconds long-seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
doc=docs/PERFORMANCE.md
base=$(sed -n 's/^Baseline for scripts\/callgrind-check.sh: \([0-9,]*\) instructions per request.*/\1/p' "$doc" | tr -d ,)
[ -n "$base" ] || { echo "callgrind-check: no baseline line in $doc" >&2; exit 2; }
# Two measurements, the lower one counts: a disturbed run (a busy
# machine changes how requests batch) only ever adds instructions.
now=
for i in 1 2; do
    out=$(bash scripts/callgrind-null.sh "${1:-2}" "${2:-6}")
    echo "$out"
    n=$(sed -n 's/^instructions per request: \([0-9]*\)$/\1/p' <<<"$out")
    [ -n "$n" ] || { echo "callgrind-check: no figure in the output above" >&2; exit 2; }
    if [ -z "$now" ] || [ "$n" -lt "$now" ]; then now=$n; fi
done
python3 - "$now" "$base" <<'PY'
import sys
now, base = int(sys.argv[1]), int(sys.argv[2])
r = now / base
print(f"callgrind-check: {now} instructions per request, baseline {base}: {r:.3f}x")
if r > 1.10:
    print("callgrind-check: FAILED: the request path costs more than 10 % above the baseline "
          "(docs/PERFORMANCE.md); find what grew with callgrind_annotate, or justify and raise the baseline")
    sys.exit(1)
if r < 0.90:
    print("callgrind-check: the request path got more than 10 % cheaper: lower the baseline in "
          "docs/PERFORMANCE.md so that the check keeps its teeth")
PY
