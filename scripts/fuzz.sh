#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ (not part of the test command: it needs nightly and
# minutes, not seconds).
#
#   scripts/fuzz.sh [TARGET|all] [SECONDS]     default: all targets, 180 s each
#
# Each target runs alone (one libFuzzer process, niced) for SECONDS on its corpus
# (fuzz/corpus/TARGET, kept between runs) seeded from fuzz/seeds/TARGET. At the end a line
# per target: executions, executions per second, corpus size and crashes (inputs saved in
# fuzz/artifacts/TARGET; replay one with `cargo +nightly fuzz run TARGET FILE`). A target's
# keywords, if any, are in fuzz/dicts/TARGET.dict.
set -euo pipefail

cd "$(dirname "$0")/../fuzz"
target=${1:-all}
seconds=${2:-180}
case $seconds in '' | *[!0-9]*) echo "SECONDS must be a whole number, not $seconds" >&2; exit 2 ;; esac

if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

all=$(cargo +nightly fuzz list)
if [ "$target" = all ]; then
    targets=$all
elif grep -qx -- "$target" <<<"$all"; then
    targets=$target
else
    echo "no fuzz target $target; there are: $(echo $all)" >&2
    exit 2
fi

nice -n 10 cargo +nightly fuzz build

summary=()
failed=0
for t in $targets; do
    mkdir -p "corpus/$t" "artifacts/$t"
    before=$(find "artifacts/$t" -type f | wc -l)
    log=$(mktemp)
    echo "== $t for ${seconds}s" >&2
    status=0
    dict=()
    [ -f "dicts/$t.dict" ] && dict=(-dict="dicts/$t.dict")
    # -timeout: an input taking 10 s is a hang; -rss_limit_mb: more than 2 GiB is a runaway
    # allocation. Both count as crashes.
    nice -n 10 cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
        -print_final_stats=1 "${dict[@]}" >"$log" 2>&1 || status=$?
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    corpus=$(find "corpus/$t" -type f | wc -l)
    crashes=$(($(find "artifacts/$t" -type f | wc -l) - before))
    if [ "$status" -ne 0 ]; then
        failed=1
        grep -E "panicked|ERROR: libFuzzer|SUMMARY|Test unit written" "$log" | head -8 >&2 || true
    fi
    summary+=("$(printf '%-12s %12s execs %8s/s  corpus %6s  crashes %s%s' "$t" "${runs:-?}" \
        "${speed:-?}" "$corpus" "$crashes" "$([ "$status" -ne 0 ] && echo "  (exit $status, log $log)")")")
    [ "$status" -eq 0 ] && rm -f "$log"
done

printf '%s\n' "${summary[@]}"
exit $failed
