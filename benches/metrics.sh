#!/bin/sh
# The metrics' cost end to end: flat-out throughput per `durability` mode without the
# metrics endpoint and with it served and scraped every second, alternating runs in one
# sitting; prints every run, the medians and their ratio (BENCHMARKS.md: within 5%).
# The demo deployment (plugins.toml) with its durability set to each mode, `plugind bench`
# in a separate process, as benches/durability.sh runs it. Run from the repository root
# after the README's command 1 built and installed everything (target/release/plugind, the
# bench plugin in plugins.d); needs curl.
# (BIN=target/debug/plugind tries the script out on a debug build; its figures mean nothing.)
# Usage: [RUNS=5] [COUNT=1000000] [WARMUP=200000] [PORT=9464] [PROFILE=1] benches/metrics.sh [fsync memory]
# PROFILE=1 also records a CPU profile of the daemon (perf, 999 Hz, call graphs) during each
# scraped run: out/perf-MODE-RUN.data; see the share of the metrics with
#   perf report -i out/perf-MODE-RUN.data --no-children --sort symbol | grep -Ei 'metrics|exporter|prometheus_client|hyper'
set -eu
plugind=${BIN:-./target/release/plugind}
modes=${*:-fsync memory}
runs=${RUNS:-5}
count=${COUNT:-1000000}
port=${PORT:-9464}
mkdir -p out

# One run: $1 the mode, $2 1 to serve and scrape the metrics, $3 the run's number; prints
# the end-to-end msgs/s.
run_once() {
    rm -rf state out/bench.json
    sync
    sleep 2
    sed -e "s/^durability = .*/durability = \"$1\"/" -e '/^metrics = /d' plugins.toml > plugins-bench.toml
    if [ "$2" = 1 ]; then
        sed -i "s/^\[host\]\$/[host]\nmetrics = \"127.0.0.1:$port\"/" plugins-bench.toml
    fi
    "$plugind" run -c plugins-bench.toml 2> "out/daemon-metrics-$1-$2-$3.log" &
    daemon=$!
    sleep 1
    # Warm up (the ledger's first pages, the plugin's first calls).
    "$plugind" bench -c plugins-bench.toml --count "${WARMUP:-200000}" --report out/bench.json > /dev/null
    scraper=
    profiler=
    if [ "$2" = 1 ]; then
        while kill -0 "$daemon" 2> /dev/null; do
            curl -sf -o /dev/null "http://127.0.0.1:$port/metrics" || echo "scrape failed" >&2
            sleep 1
        done &
        scraper=$!
        if [ "${PROFILE:-0}" = 1 ]; then
            perf record -q -F 999 -g -p "$daemon" -o "out/perf-$1-$3.data" > /dev/null 2>&1 &
            profiler=$!
        fi
    fi
    result=$("$plugind" bench -c plugins-bench.toml --count "$count" --report out/bench.json --json)
    [ -n "$profiler" ] && kill -INT "$profiler" && wait "$profiler" || true
    kill -TERM "$daemon"
    wait "$daemon" || true
    [ -n "$scraper" ] && { kill "$scraper" 2> /dev/null; wait "$scraper" 2> /dev/null || true; }
    echo "$result" | sed -n 's/.*"end_to_end_msgs_per_sec":\([0-9.]*\).*/\1/p' | cut -d. -f1
}

median() {
    sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print int((v[NR / 2] + v[NR / 2 + 1]) / 2) }'
}

for mode in $modes; do
    echo "== durability = $mode: $runs alternating runs of $count messages, flat out"
    : > "out/metrics-$mode-without.txt"
    : > "out/metrics-$mode-with.txt"
    run=1
    while [ "$run" -le "$runs" ]; do
        without=$(run_once "$mode" 0 "$run")
        with=$(run_once "$mode" 1 "$run")
        echo "$without" >> "out/metrics-$mode-without.txt"
        echo "$with" >> "out/metrics-$mode-with.txt"
        echo "  run $run: without metrics $without msgs/s, with metrics scraped every second $with msgs/s"
        run=$((run + 1))
    done
    a=$(median < "out/metrics-$mode-without.txt")
    b=$(median < "out/metrics-$mode-with.txt")
    echo "  median: without $a, with $b msgs/s: $(awk "BEGIN { printf \"%+.1f%%\", ($b - $a) * 100 / $a }")"
    echo "  spread without: $(sort -n "out/metrics-$mode-without.txt" | sed -n '1p;$p' | paste -sd- -); with: $(sort -n "out/metrics-$mode-with.txt" | sed -n '1p;$p' | paste -sd- -)"
done
rm -f plugins-bench.toml
