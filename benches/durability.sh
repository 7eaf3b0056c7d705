#!/bin/sh
# End-to-end throughput and latency per `durability` mode: the demo deployment with its
# durability set to each mode in turn, `plugind bench` in a separate process.
# Run from the repository root after the README's command 1 built and installed everything.
# Usage: [FLAT=0] [BATCHES="8 4 2"] benches/durability.sh [fsync buffered memory]
# (FLAT=0 skips the flat-out runs; BATCHES are the batch sizes of the 10,000 msgs/s runs.)
set -eu
modes=${*:-fsync buffered memory}
for mode in $modes; do
    rm -rf state out/bench.json; sync; sleep 5
    mkdir -p out
    sed "s/^durability = .*/durability = \"$mode\"/" plugins.toml > plugins-bench.toml
    ./target/release/plugind run -c plugins-bench.toml 2> out/daemon-$mode.log &
    daemon=$!
    sleep 1
    echo "== durability = $mode"
    ./target/release/plugind bench -c plugins-bench.toml --count 200000 --report out/bench.json > /dev/null
    if [ "${FLAT:-1}" != 0 ]; then
        for run in 1 2 3; do
            ./target/release/plugind bench -c plugins-bench.toml --count 1000000 --report out/bench.json | tail -3
        done
        ls -l state/ledger.db state/ledger.db-wal 2>/dev/null | awk '{print "  " $5, $9}'
        # The ledger gives the space of 3,000,000 messages back (housekeeping, a few MiB a
        # second) before latency is measured.
        sleep "${PAUSE:-0}"
    fi
    for batch in ${BATCHES:-8}; do
        for run in 1 2; do
            echo "-- 10000 msgs/s, batch $batch"
            ./target/release/plugind bench -c plugins-bench.toml --count 100000 --rate 10000 --batch "$batch" --report out/bench.json | tail -3
        done
    done
    kill -TERM $daemon
    wait $daemon || true
    grep "ledger: commits" out/daemon-$mode.log || true
done
rm -f plugins-bench.toml
