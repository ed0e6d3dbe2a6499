#!/usr/bin/env bash
# Instructions per W1 round trip, caller and worker apart, counted by callgrind
# (`benches/instructions.rs` says how). Exact and repeatable where timings on a shared VM are
# not: use it to see what a change to the task path costs in code, then time it with
# `benches/workloads.rs`.
#
#   benches/count_instructions.sh            # totals per round trip
#   benches/count_instructions.sh --detail   # and the functions that cost most (inclusive)
#
# Needs valgrind (Debian: apt-get install valgrind). About a minute.
set -euo pipefail
cd "$(dirname "$0")/.."

detail=0
[[ "${1:-}" == "--detail" ]] && detail=1
command -v valgrind >/dev/null || { echo "valgrind not found (Debian: apt-get install valgrind)" >&2; exit 1; }

exe=$(cargo bench --bench instructions --no-run 2>&1 | sed -n 's/.*Executable .*(\(.*\))$/\1/p' | tail -1)
[[ -x "$exe" ]] || { echo "cannot find the instructions bench executable" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# The worker program for the worker's count: the same executable, started under callgrind.
cat > "$tmp/worker.sh" <<EOF
#!/bin/sh
exec valgrind --tool=callgrind --callgrind-out-file="$tmp/worker.\$N.out" "$exe" "\$@" 2>/dev/null
EOF
chmod +x "$tmp/worker.sh"

small=2000
large=12000
for n in $small $large; do
    # The caller counted; its worker runs natively.
    N=$n valgrind --tool=callgrind --callgrind-out-file="$tmp/caller.$n.out" "$exe" >/dev/null 2>"$tmp/caller.$n.err" \
        || { cat "$tmp/caller.$n.err" >&2; exit 1; }
    # The worker counted; the caller runs natively.
    N=$n WORKER_PROGRAM="$tmp/worker.sh" "$exe" >/dev/null
done

total() { sed -n 's/^summary: *\([0-9]*\).*/\1/p' "$1" | head -1; }
per_trip() { echo $(( ( $(total "$2") - $(total "$1") ) / (large - small) )); }
caller=$(per_trip "$tmp/caller.$small.out" "$tmp/caller.$large.out")
worker=$(per_trip "$tmp/worker.$small.out" "$tmp/worker.$large.out")
echo "instructions per round trip (u64 task, u64 result; $small vs $large round trips):"
echo "  caller  $caller"
echo "  worker  $worker"
echo "  both    $(( caller + worker ))"

if (( detail )); then
    for side in caller worker; do
        echo
        echo "$side, per round trip, inclusive (functions of at least 10):"
        for n in $small $large; do
            callgrind_annotate --inclusive=yes --show-percs=no "$tmp/$side.$n.out" 2>/dev/null \
                | sed -n 's/^ *\([0-9,]*\)  [^:]*:\(.*\) \[.*$/\1\t\2/p' | tr -d ',' > "$tmp/$side.$n.fns"
        done
        awk -F'\t' -v d=$(( large - small )) '
            NR == FNR { a[$2] = $1; next }
            { v = ($1 - a[$2]) / d; if (v >= 10 && !seen[$2]++) printf "%8.1f  %s\n", v, $2 }' \
            "$tmp/$side.$small.fns" "$tmp/$side.$large.fns" | sort -rn | head -30
    done
fi
