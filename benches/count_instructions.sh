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
exec valgrind --tool=callgrind --callgrind-out-file="$tmp/worker.\$RUN.\$N.out" "$exe" "\$@" 2>/dev/null
EOF
chmod +x "$tmp/worker.sh"

small=2000
large=12000
runs=3
for r in $(seq $runs); do
    for n in $small $large; do
        # The caller counted; its worker runs natively.
        N=$n valgrind --tool=callgrind --callgrind-out-file="$tmp/caller.$r.$n.out" "$exe" >/dev/null 2>"$tmp/caller.err" \
            || { cat "$tmp/caller.err" >&2; exit 1; }
        # The worker counted; the caller runs natively.
        N=$n WORKER_PROGRAM="$tmp/worker.sh" RUN=$r "$exe" >/dev/null
    done
done

total() { sed -n 's/^summary: *\([0-9]*\).*/\1/p' "$1" | head -1; }
# Per round trip: the difference between the two lengths, per extra round trip; the median of
# the runs (a side that finds the other not done yet spins a little, differently each run).
per_trip() {
    for r in $(seq $runs); do
        echo $(( ( $(total "$tmp/$1.$r.$large.out") - $(total "$tmp/$1.$r.$small.out") ) / (large - small) ))
    done | sort -n | sed -n "$(( (runs + 1) / 2 ))p"
}
caller=$(per_trip caller)
worker=$(per_trip worker)
echo "instructions per round trip (u64 task, u64 result; $small vs $large round trips, median of $runs runs):"
echo "  caller  $caller"
echo "  worker  $worker"
echo "  both    $(( caller + worker ))"

if (( detail )); then
    for side in caller worker; do
        echo
        echo "$side, per round trip, inclusive (functions of at least 10):"
        for n in $small $large; do
            callgrind_annotate --inclusive=yes --show-percs=no "$tmp/$side.1.$n.out" 2>/dev/null \
                | sed -n 's/^ *\([0-9,]*\)  [^:]*:\(.*\) \[.*$/\1\t\2/p' | tr -d ',' > "$tmp/$side.$n.fns"
        done
        awk -F'\t' -v d=$(( large - small )) '
            NR == FNR { a[$2] = $1; next }
            $2 ~ /^(main|\(below main\)|0x[0-9a-f]+|__libc_start_main.*|std::rt::.*|std::sys::backtrace::.*|instructions::main|stateful_pool::serve|stateful_pool::worker::boot::enter)$/ { next }
            { v = ($1 - a[$2]) / d; if (v >= 10 && !seen[$2]++) printf "%8.1f  %s\n", v, $2 }' \
            "$tmp/$side.$small.fns" "$tmp/$side.$large.fns" | sort -rn | head -30
    done
fi
