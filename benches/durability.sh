#!/bin/sh
# End-to-end throughput and latency per `durability` mode: the demo deployment with its
# durability set to each mode in turn, `plugind bench` in a separate process.
# Run from the repository root after the README's command 1 built and installed everything.
# Usage: benches/durability.sh [fsync buffered memory]
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
    for run in 1 2 3; do
        ./target/release/plugind bench -c plugins-bench.toml --count 1000000 --report out/bench.json | tail -3
    done
    for run in 1 2; do
        ./target/release/plugind bench -c plugins-bench.toml --count 100000 --rate 10000 --batch 8 --report out/bench.json | tail -3
    done
    kill -TERM $daemon
    wait $daemon || true
    grep "ledger: commits" out/daemon-$mode.log || true
done
rm -f plugins-bench.toml
