#!/usr/bin/env bash
# scripts/load.sh: one load against a fresh postino, with where its CPU went.
#
# Starts `postino serve` on a temporary data directory (and, for relay, a
# `postino bench sink` on 127.0.0.2 as the smarthost), sends N messages of
# 1 KiB with Postfix's smtp-source (20 sessions, one message per
# connection, as scripts/compare.sh does), waits until the sink has every
# relayed message, and prints the rate and, per thread kind, the context
# switches per message and the CPU seconds: what BENCHMARKS.md's profile
# notes were read from. Loopback only; bounded waits.
#
# Usage: scripts/load.sh local|relay [N] [STORE-SETTINGS]
#   STORE-SETTINGS: TOML lines for [store], e.g. 'commit_delay = "0s"'
# Environment: POSTINO (binary, default target/release/postino under
#   CARGO_TARGET_DIR or ./target), PORT (first of 5 ports, default 27100).
set -euo pipefail

MODE=${1:-}
N=${2:-10000}
EXTRA=${3:-}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${POSTINO:-${CARGO_TARGET_DIR:-$ROOT/target}/release/postino}
P=${PORT:-27100}
case $MODE in local) RCPT=user1@example.test ;; relay) RCPT=user1@remote.test ;;
    *) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2 ;; esac
[[ $N =~ ^[0-9]+$ && $N -gt 0 ]] || { echo "load.sh: not a positive number: $N" >&2; exit 2; }
[ -x "$BIN" ] || { echo "load.sh: no $BIN (cargo build --release -p postino-cli)" >&2; exit 2; }
command -v smtp-source >/dev/null || { echo "load.sh: smtp-source missing (apt-get install postfix)" >&2; exit 2; }

W=$(mktemp -d /tmp/postino-load.XXXXXX)
SINK=""; SRV=""
cleanup() { kill $SINK $SRV 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
sed -e "s#@PN@#$W#g" -e "s#@SMTP_PORT@#$P#" -e "s#@POP3_PORT@#$((P + 1))#" \
    -e "s#@SINK_PORT@#$((P + 4))#" "$ROOT/scripts/compare/postino.toml" >"$W/postino.toml"
[ -n "$EXTRA" ] && printf '[store]\n%s\n' "$EXTRA" >>"$W/postino.toml"
echo password | "$BIN" --config "$W/postino.toml" user add user1@example.test >/dev/null
"$BIN" bench sink --listen "127.0.0.2:$((P + 4))" --count-file "$W/sink.count" >"$W/sink.log" 2>&1 &
SINK=$!
"$BIN" --config "$W/postino.toml" serve >"$W/serve.log" 2>&1 &
SRV=$!
for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$P) 2>/dev/null && break; sleep 0.1; done

t0=$(date +%s.%N)
timeout $((60 + N / 50)) smtp-source -c -l 1024 -m "$N" -s 20 -f bench@postino.test -t "$RCPT" \
    "127.0.0.1:$P" >/dev/null
t1=$(date +%s.%N)
if [ "$MODE" = relay ]; then
    for _ in $(seq 600); do
        [ "$(cat "$W/sink.count" 2>/dev/null || echo 0)" -ge "$N" ] && break
        sleep 0.05
    done
    t1=$(date +%s.%N)
fi
awk -v n="$N" -v a="$t0" -v b="$t1" 'BEGIN { printf "%s messages in %.2f s = %.0f/s\n", n, b - a, n / (b - a) }'
for t in /proc/$SRV/task/*; do
    printf '%s\t%s\t%s\n' "$(cat "$t/comm")" \
        "$(awk '/voluntary_ctxt_switches/ { s += $2 } END { print s }' "$t/status")" \
        "$(sed 's/.*) //' "$t/stat" | awk '{ print $12 + $13 }')"
done | awk -F'\t' -v n="$N" '{ k = $1; sub(/-[0-9]+$/, "", k); c[k] += $2; u[k] += $3 }
    END { for (k in c) printf "  %-16s %5.1f switches/msg  %6.2f s CPU\n", k, c[k] / n, u[k] / 100 }' | sort
