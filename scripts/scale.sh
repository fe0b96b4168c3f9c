#!/usr/bin/env bash
# scripts/scale.sh: issue 5's scaling targets, as BENCHMARKS.md ("Scaling")
# measured them, against the postino binary only (no Postfix needed):
#
#   1. a store with FILL deferred messages (`postino bench fill-queue`) and
#      an empty one; then per store, alternated (empty deep deep empty empty
#      deep), a server start, 3 local and 3 relay loads of MESSAGES each
#      (`postino bench smtp`, 20 sessions, 1 KiB; relay goes to a `bench
#      sink` on 127.0.0.2); rate, p99, server CPU per message, RSS;
#   2. 10x: MESSAGES/2 against 5*MESSAGES local messages on fresh stores,
#      alternated, three of each; time, CPU, RSS, disk;
#   3. 10,000 sessions held open at once (`--hold`), each sending one
#      message; the server's peak RSS.
#
# Usage: scripts/scale.sh [--fill N] [--messages N] [--dir DIR] [--keep]
#   defaults: --fill 1000000 --messages 20000 --dir a new temporary directory
#   (the deep store needs ~3.3 KiB per message: 3.3 GiB for a million).
# Environment: POSTINO (binary, default target/release/postino under
#   CARGO_TARGET_DIR or ./target). Ports 27525 and 127.0.0.2:27526.
# Loopback only; every wait is bounded.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
B=${POSTINO:-${CARGO_TARGET_DIR:-$ROOT/target}/release/postino}
FILL=1000000
MESSAGES=20000
DIR=""
KEEP=0
while [ $# -gt 0 ]; do
    case $1 in
        --fill) FILL=$2; shift 2 ;;
        --messages) MESSAGES=$2; shift 2 ;;
        --dir) DIR=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "scale.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
for n in "$FILL" "$MESSAGES"; do
    [[ $n =~ ^[0-9]+$ && $n -ge 2 ]] || { echo "scale.sh: not a number >= 2: $n" >&2; exit 2; }
done
[ -x "$B" ] || { echo "scale.sh: no $B (cargo build --release -p postino-cli)" >&2; exit 2; }
if [ -z "$DIR" ]; then DIR=$(mktemp -d /tmp/postino-scale.XXXXXX); else mkdir -p "$DIR"; fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
SINK=""; SRV=""
cleanup() {
    kill $SINK $SRV 2>/dev/null || true
    wait 2>/dev/null || true
    [ "$KEEP" = 1 ] || rm -rf "$DIR"
}
trap cleanup EXIT
log() { printf '[scale %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# config NAME [EXTRA-SMTP-LINES]: $DIR/NAME.toml with data in $DIR/NAME.
config() {
    cat >"$DIR/$1.toml" <<EOT
hostname = "mx.scale.test"
data_dir = "$DIR/$1"
[smtp]
listen = ["127.0.0.1:27525"]
${2:-}
[routing]
local_domains = ["example.test"]
relay_networks = ["127.0.0.0/8"]
smarthost = "127.0.0.2:27526"
EOT
    echo secret | "$B" --config "$DIR/$1.toml" user add user1@example.test >/dev/null
}
start() {
    "$B" --config "$DIR/$1.toml" serve >"$DIR/serve-$1.log" 2>&1 &
    SRV=$!
    for _ in $(seq 400); do (echo >/dev/tcp/127.0.0.1/27525) 2>/dev/null && return 0; sleep 0.025; done
    log "server did not start: $(tail -3 "$DIR/serve-$1.log")"; exit 1
}
stop() { kill "$SRV"; wait "$SRV" 2>/dev/null || true; SRV=""; }
cpu() { sed 's/.*) //' "/proc/$SRV/stat" | awk '{ print $12 + $13 }'; }
rss() { awk "/$1/ { print \$2 }" "/proc/$SRV/status"; }
field() { sed -n "s/^ *\"$1\": \([0-9.]*\).*/\1/p" "$DIR/r.json" | head -1; }
sink_count() { cat "$DIR/sink.count" 2>/dev/null || echo 0; }
# load KIND N: one bench smtp load; prints ok, rate, p99 and CPU per message.
load() {
    local kind=$1 n=$2 pattern count c0 base
    if [ "$kind" = local ]; then pattern='user1@example.test'; count=1; else pattern='user{n}@remote.test'; count=20; fi
    c0=$(cpu); base=$(sink_count)
    timeout $((60 + n / 100)) "$B" bench smtp --server 127.0.0.1:27525 --sessions 20 --messages "$n" --size 1024 \
        --rcpt-pattern "$pattern" --rcpt-count "$count" --json "$DIR/r.json" >"$DIR/r.txt" 2>&1 || true
    if [ "$kind" = relay ]; then
        for _ in $(seq 1200); do [ "$(sink_count)" -ge $((base + n)) ] && break; sleep 0.05; done
    fi
    awk -v kind="$kind" -v ok="$(field ok)" -v rate="$(field throughput_per_s)" -v p99="$(field p99)" \
        -v ticks=$(($(cpu) - c0)) -v n="$n" -v el="$(field elapsed_s)" \
        'BEGIN { printf "  %-5s ok=%s %.2f s %.0f msg/s p99=%.1f ms cpu=%.0f us/msg\n", kind, ok, el, rate, p99 / 1000, ticks * 10000 / n }'
}

log "stores in $DIR"
"$B" bench sink --listen 127.0.0.2:27526 --count-file "$DIR/sink.count" >"$DIR/sink.log" 2>&1 &
SINK=$!
config empty
config deep
log "filling the deep store with $FILL deferred messages"
/usr/bin/time -f "  fill: %e s, user %U s, sys %S s, max RSS %M KiB" \
    "$B" --config "$DIR/deep.toml" bench fill-queue --count "$FILL" --size 1024 --domain deferred.test >/dev/null
echo "  deep store: $(du -sh "$DIR/deep" | cut -f1)"

log "accept rates, empty queue and $FILL deferred, alternated"
for store in empty deep deep empty empty deep; do
    t0=$(date +%s.%N); start "$store"; t1=$(date +%s.%N)
    awk -v s="$store" -v t="$(echo "$t1 - $t0" | bc)" -v r="$(rss VmRSS)" \
        'BEGIN { printf "%s: started in %.2f s, RSS %d MiB\n", s, t, r / 1024 }'
    for kind in local local local relay relay relay; do load "$kind" "$MESSAGES"; done
    echo "  RSS at the end $(($(rss VmRSS) / 1024)) MiB (peak $(($(rss VmHWM) / 1024)) MiB), store $(du -sh "$DIR/$store" | cut -f1)"
    stop
done

log "10x: $((MESSAGES / 2)) against $((MESSAGES * 5)) messages, fresh stores"
for n in $((MESSAGES / 2)) $((MESSAGES * 5)) $((MESSAGES / 2)) $((MESSAGES * 5)) $((MESSAGES / 2)) $((MESSAGES * 5)); do
    rm -rf "$DIR/lin"; config lin; start lin
    echo "$n: $(load local "$n") peak RSS $(($(rss VmHWM) / 1024)) MiB, store $(du -sh "$DIR/lin" | cut -f1)"
    stop
done

log "10,000 sessions held open at once"
rm -rf "$DIR/hold"
config hold $'max_connections_per_ip = 20000\nmax_connections = 20000'
start hold
timeout 300 "$B" bench smtp --server 127.0.0.1:27525 --hold --sessions 10000 --messages 10000 --size 1024 \
    --rcpt-pattern 'user1@example.test' --rcpt-count 1 --json "$DIR/r.json" >"$DIR/r.txt" 2>&1 || true
echo "hold: $(head -1 "$DIR/r.txt"); $(grep held "$DIR/r.txt"); server peak RSS $(($(rss VmHWM) / 1024)) MiB"
stop
