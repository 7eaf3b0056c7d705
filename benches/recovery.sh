#!/bin/sh
# Recovery and footprint of pending deliveries: N messages of 256 bytes published to an
# instance that cannot start (they wait in the ledger), then the daemon is stopped and
# started again. Reports state-dir bytes per pending message, the time from start to ready
# (warm cache, then cold if /proc/sys/vm/drop_caches is writable), and the daemon's RSS with
# nothing pending and with N pending.
# Run from the repository root after the README's command 1. Usage: benches/recovery.sh [N]
set -eu
n=${1:-1000000}
rm -rf state out/bench.json
mkdir -p out
# The bench instance writes its report into a directory that does not exist: `new` fails,
# the instance does not start, and its deliveries wait.
sed -e 's/^durability = .*/durability = "fsync"/' -e 's#^output = .*#output = "out/missing/bench.json"#' \
    plugins.toml > plugins-bench.toml
rss() { awk '/VmRSS/ {print $2 " kB"}' /proc/$1/status; }
start() {
    t0=$(date +%s.%N)
    ./target/release/plugind run -c plugins-bench.toml 2> out/recovery.log &
    daemon=$!
    until grep -q "plugind ready" out/recovery.log; do sleep 0.01; done
    t1=$(date +%s.%N)
    echo "  start to ready: $(echo "$t1 - $t0" | bc) s; $(grep -o 'ledger recovered.*' out/recovery.log || echo 'nothing to recover')"
}
stop() { kill -TERM $daemon; wait $daemon || true; }
start
echo "  RSS with nothing pending: $(rss $daemon)"
./target/release/plugind bench -c plugins-bench.toml --count "$n" | tail -1
sleep 1
echo "  RSS with $n pending (accepted in this run): $(rss $daemon)"
stop
bytes=$(du -sb state | cut -f1)
reserve=$(stat -c %s state/reserve)
echo "  state dir: $bytes bytes, of which reserve $reserve; per pending message: $(( (bytes - reserve) / n )) bytes"
echo "restart, warm cache:"
start
echo "  RSS after recovering $n pending: $(rss $daemon)"
stop
if [ -w /proc/sys/vm/drop_caches ]; then
    sync
    echo 3 > /proc/sys/vm/drop_caches
    echo "restart, cold cache:"
    start
    stop
else
    echo "cold cache: not measured (/proc/sys/vm/drop_caches is not writable here)"
fi
rm -f plugins-bench.toml
