#!/usr/bin/env bash
# scripts/compare.sh: the same loads against Postfix + Dovecot and postino, side
# by side on this machine, over loopback only; prints the ratios (issue 5).
#
# It installs postfix and dovecot-pop3d from Debian's packages if they are
# missing, runs a private Postfix instance (own config, queue and Maildirs in a
# temporary directory) and a private Dovecot (POP3 only) on loopback ports, and
# a `postino bench sink` on 127.0.0.2 as the remote MX. postino's part is
# skipped when its binary (or its `serve` command) is not there.
#
# Loads (20 sessions of 1 KiB messages unless told otherwise):
#   local   SMTP -> local mailboxes, end to end (until every message is in a
#           Maildir / counted by POP3 STAT), with smtp-source and postino bench
#   relay   SMTP -> relay to the sink, end to end (counted at the sink)
#   ceiling smtp-source -> smtp-sink (protocol only, stores nothing)
#   latency p50/p99 from the final dot to the 250 at half the local rate
#           (open loop, postino bench --rate)
#   pop3    RETR of ~2 KiB messages, 21 sessions (one mailbox each)
#
# With --tls, the same machine set up for TLS both ways instead (issue 12):
# one RSA-2048 certificate for Postfix's smtpd, postino's listener and the
# sink; Postfix with smtpd_tls_security_level = may and smtp_tls_security_level
# = may (Debian's session caches), postino with its defaults (outbound `may`),
# the sink offering STARTTLS. Only postino bench speaks STARTTLS as a client,
# so these loads use it alone, one message per inbound connection (a
# handshake per message) unless --messages-per-session says otherwise:
#   local   SMTP+TLS -> local mailboxes
#   relay   SMTP+TLS -> relay over TLS to the sink (postino: connection reuse
#           on, then off through `postino reload`; Postfix: its default,
#           smtp_tls_connection_reuse = no)
# and no ceiling, latency or POP3 loads.
#
# Where the cgroup v1 cpuacct controller is writable, each server runs in its
# own cgroup and every load's note gives the server's CPU time per message
# (all of Postfix's processes; postino's one process).
#
# With --cluster, issue 13's cluster numbers instead (scripts/compare/cluster.sh):
# Postfix, one postino node on sled, then 1, 2 and 3 postino nodes sharing a
# throwaway PostgreSQL, local delivery and relay each; besides the rate, CPU
# per message of the servers and of PostgreSQL, statements, commits and WAL
# writes/fsyncs per message, and what PostgreSQL's sessions waited on.
#
# Usage: scripts/compare.sh [--messages N] [--sessions N] [--size N]
#          [--pop3-messages N] [--pop3-rounds N] [--out DIR] [--keep]
#          [--no-postino] [--build] [--tls] [--messages-per-session N]
#          [--cluster]
# Environment: POSTINO (postino binary, default target/release/postino under
#   CARGO_TARGET_DIR or ./target), BENCH (binary providing `bench`, default
#   $POSTINO), PORT_BASE (first of the loopback ports used, default 26000).
# Exit status: 0 when every enabled measurement completed, 1 otherwise.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TEMPLATES=$ROOT/scripts/compare
MESSAGES=20000
SESSIONS=20
SIZE=1024
POP3_USERS=21
POP3_MESSAGES=1000   # per mailbox
POP3_ROUNDS=3        # timed passes over every mailbox
POP3_SIZE=1800       # body octets: ~2 KiB stored with headers
OUT=$ROOT/target/compare
KEEP=0
WITH_POSTINO=1
BUILD=0
TLS=0
PER_SESSION=1
CLUSTER=0
PORT_BASE=${PORT_BASE:-26000}

while [ $# -gt 0 ]; do
    case $1 in
        --messages) MESSAGES=$2; shift 2 ;;
        --sessions) SESSIONS=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --pop3-messages) POP3_MESSAGES=$2; shift 2 ;;
        --pop3-rounds) POP3_ROUNDS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --no-postino) WITH_POSTINO=0; shift ;;
        --build) BUILD=1; shift ;;
        --tls) TLS=1; shift ;;
        --messages-per-session) PER_SESSION=$2; shift 2 ;;
        --cluster) CLUSTER=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "compare.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
for n in "$MESSAGES" "$SESSIONS" "$SIZE" "$POP3_MESSAGES" "$POP3_ROUNDS" "$PORT_BASE"; do
    [[ $n =~ ^[0-9]+$ && $n -gt 0 ]] || { echo "compare.sh: not a positive number: $n" >&2; exit 2; }
done
[[ $PER_SESSION =~ ^[0-9]+$ ]] || { echo "compare.sh: not a number: $PER_SESSION" >&2; exit 2; }

# Ports, all on loopback. The sink listens on 127.0.0.2 so that "remote" mail
# leaves through another address, as it would to a real MX.
PF_SMTP=$PORT_BASE
DV_POP3=$((PORT_BASE + 1))
PN_SMTP=$((PORT_BASE + 2))
PN_POP3=$((PORT_BASE + 3))
SINK_PORT=$((PORT_BASE + 4))
SMTP_SINK_PORT=$((PORT_BASE + 5))
SINK_ADDR=127.0.0.2
VUSER=nobody

log() { printf '[compare %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- cleanup
WORK=""
PIDS=()
CGROUPS=()
CHILD=""
PF_STARTED=0
DV_PID_FILE=""
cleanup() {
    local status=$?
    set +e
    trap - EXIT INT TERM
    if [ "$PF_STARTED" = 1 ]; then
        timeout 60 postfix -c "$WORK/postfix/etc" stop >/dev/null 2>&1 ||
            timeout 10 postfix -c "$WORK/postfix/etc" abort >/dev/null 2>&1
    fi
    if [ -n "$DV_PID_FILE" ] && [ -s "$DV_PID_FILE" ]; then
        kill "$(cat "$DV_PID_FILE")" 2>/dev/null
    fi
    # Only the processes this script started, by PID. (timeout(1) passes
    # the TERM on to the command it runs.)
    [ -n "$CHILD" ] && kill "$CHILD" 2>/dev/null
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null
    done
    # --cluster: its PostgreSQL, once the nodes are gone.
    declare -F cluster_cleanup >/dev/null && cluster_cleanup
    if [ -n "$DV_PID_FILE" ]; then
        for _ in $(seq 50); do [ -e "$DV_PID_FILE" ] || break; sleep 0.1; done
    fi
    local cg
    for cg in "${CGROUPS[@]}"; do
        for _ in $(seq 50); do rmdir "$cg" 2>/dev/null && break; sleep 0.1; done
    done
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if [ "$KEEP" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- helpers
# run_child CMD...: runs a load in the background and waits for it. bash runs
# INT/TERM traps only once a foreground command has ended; `wait` returns at
# once, so an interrupted run cleans up at once.
run_child() {
    "$@" &
    CHILD=$!
    local rc=0
    wait "$CHILD" || rc=$?
    CHILD=""
    return "$rc"
}
now() { date +%s.%N; }
# Floating-point arithmetic without bc: calc "expression".
calc() { awk "BEGIN { printf \"%.6f\", $1 }"; }
fmt0() { awk "BEGIN { printf \"%.0f\", $1 }"; }

port_free() { ! (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
# wait_port HOST PORT SECONDS: until something accepts connections there.
wait_port() {
    local deadline=$((SECONDS + $3))
    while [ $SECONDS -lt "$deadline" ]; do
        if (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

# pop3_stat PORT USER PASSWORD: prints the message count (STAT), or fails.
pop3_stat() {
    local fd line
    exec {fd}<>"/dev/tcp/127.0.0.1/$1" || return 1
    read -r -t 10 line <&$fd || { exec {fd}>&-; return 1; }
    printf 'USER %s\r\n' "$2" >&$fd; read -r -t 10 line <&$fd
    printf 'PASS %s\r\n' "$3" >&$fd; read -r -t 10 line <&$fd
    [[ $line == +OK* ]] || { exec {fd}>&-; return 1; }
    printf 'STAT\r\n' >&$fd; read -r -t 10 line <&$fd
    printf 'QUIT\r\n' >&$fd; read -r -t 10 _ <&$fd || true
    exec {fd}>&-
    [[ $line == +OK* ]] || return 1
    line=${line#+OK }
    echo "${line%% *}"
}

# fill TEMPLATE DEST VAR=VALUE...: copy a template, replacing @VAR@.
fill() {
    local src=$1 dst=$2 expr=() kv
    shift 2
    for kv in "$@"; do expr+=(-e "s|@${kv%%=*}@|${kv#*=}|g"); done
    sed "${expr[@]}" "$src" >"$dst"
}

# CPU accounting: one cgroup v1 cpuacct group per server, when writable.
CG_ROOT=/sys/fs/cgroup/cpuacct
cg_path() { echo "$CG_ROOT/postino-compare-$$-$1"; }
cg_make() {
    local cg
    cg=$(cg_path "$1")
    [ -w "$CG_ROOT" ] && mkdir "$cg" 2>/dev/null && CGROUPS+=("$cg")
    return 0
}
# cg_enter NAME: moves this (sub)shell into cgroup NAME, if there is one.
cg_enter() {
    local cg
    cg=$(cg_path "$1")
    if [ -w "$cg/cgroup.procs" ]; then echo "$BASHPID" >"$cg/cgroup.procs"; fi
}
# CPU nanoseconds used so far by cgroup NAME (empty without one).
cg_cpu() { cat "$(cg_path "$1")/cpuacct.usage" 2>/dev/null || true; }

# ---------------------------------------------------------------- setup
install_packages() {
    if command -v postfix >/dev/null && [ -x /usr/sbin/smtp-source ] && [ -x /usr/sbin/smtp-sink ] &&
        command -v dovecot >/dev/null && [ -e /usr/lib/dovecot/pop3 ]; then
        return 0
    fi
    [ "$(id -u)" = 0 ] || die "postfix/dovecot-pop3d missing and not root: apt-get install postfix dovecot-pop3d"
    log "installing postfix and dovecot-pop3d from Debian's packages"
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get install -y postfix dovecot-pop3d >/dev/null ||
        { timeout 600 apt-get update >/dev/null && timeout 600 apt-get install -y postfix dovecot-pop3d >/dev/null; } ||
        die "cannot install postfix dovecot-pop3d"
}

[ "$(id -u)" = 0 ] || die "run as root: Postfix and Dovecot need it to switch users"
install_packages
for p in $PF_SMTP $DV_POP3 $PN_SMTP $PN_POP3 $SMTP_SINK_PORT; do
    port_free 127.0.0.1 "$p" || die "port 127.0.0.1:$p is in use (set PORT_BASE)"
done
port_free $SINK_ADDR "$SINK_PORT" || die "port $SINK_ADDR:$SINK_PORT is in use (set PORT_BASE)"

if [ "$BUILD" = 1 ]; then
    log "building postino (release)"
    (cd "$ROOT" && timeout 3000 cargo build --release -p postino-cli) || die "cargo build failed"
fi
POSTINO=${POSTINO:-${CARGO_TARGET_DIR:-$ROOT/target}/release/postino}
BENCH=${BENCH:-$POSTINO}
[ -x "$BENCH" ] && "$BENCH" bench sink --help >/dev/null 2>&1 ||
    die "no load harness: build postino (cargo build --release -p postino-cli) or set BENCH=/path/to/binary with 'bench'"

WORK=$(mktemp -d /tmp/postino-compare.XXXXXX)
# Postfix and Dovecot run as other users: they must reach into WORK.
chmod 755 "$WORK"
mkdir -p "$OUT"
MAIL=$WORK/mail
mkdir -p "$MAIL/example.test"
VUID=$(id -u $VUSER)
VGID=$(id -g $VUSER)
chown "$VUID:$VGID" "$MAIL" "$MAIL/example.test"
NUSERS=$((POP3_USERS > SESSIONS ? POP3_USERS : SESSIONS))
if [ "$TLS" = 1 ]; then
    # One key type for everyone: RSA-2048, as most MTAs' certificates.
    TLSDIR=$WORK/tls
    mkdir -p "$TLSDIR"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=mx.bench.test \
        -addext subjectAltName=DNS:mx.bench.test,IP:127.0.0.1,IP:127.0.0.2 \
        -keyout "$TLSDIR/key.pem" -out "$TLSDIR/cert.pem" 2>"$WORK/openssl.log" ||
        die "openssl req failed: $(cat "$WORK/openssl.log")"
    chmod 644 "$TLSDIR/key.pem" "$TLSDIR/cert.pem"
    SINK_TLS=(--tls-cert "$TLSDIR/cert.pem" --tls-key "$TLSDIR/key.pem")
    BENCH_TLS=(--tls)
else
    SINK_TLS=()
    BENCH_TLS=()
fi
RESULTS=$OUT/results.tsv
printf 'target\tload\ttool\tmessages\tseconds\tper_second\tnote\n' >"$RESULTS"
FAILED=0

# record TARGET LOAD TOOL MESSAGES SECONDS NOTE
record() {
    local rate
    rate=$(fmt0 "$4 / $5")
    printf '%s\t%s\t%s\t%s\t%.3f\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$rate" "$6" >>"$RESULTS"
    log "$1 $2 ($3): $4 in $(printf %.2f "$5") s = $rate/s $6"
}

# ---------------------------------------------------------------- the sink
log "starting bench sink on $SINK_ADDR:$SINK_PORT"
SINK_STATS=$WORK/sink.json
"$BENCH" bench sink --listen "$SINK_ADDR:$SINK_PORT" --stats "$SINK_STATS" \
    --count-file "$WORK/sink.count" "${SINK_TLS[@]}" >"$WORK/sink.log" 2>&1 &
PIDS+=($!)
wait_port $SINK_ADDR "$SINK_PORT" 10 || die "bench sink did not start: $(cat "$WORK/sink.log")"
sink_count() { cat "$WORK/sink.count" 2>/dev/null || echo 0; }
sink_last() { sed -n 's/.*"last_message_unix": \([0-9.]*\).*/\1/p' "$SINK_STATS"; }
sink_field() { local v; v=$(sed -n "s/.*\"$1\": \([0-9]*\).*/\1/p" "$SINK_STATS" | head -1); echo "${v:-0}"; }

# ---------------------------------------------------------------- Postfix
PF=$WORK/postfix
mkdir -p "$PF/etc" "$PF/queue" "$PF/data"
chown postfix "$PF/data"
fill "$TEMPLATES/postfix-main.cf" "$PF/etc/main.cf" PF="$PF" MAIL="$MAIL" UID="$VUID" GID="$VGID"
fill "$TEMPLATES/postfix-master.cf" "$PF/etc/master.cf" LISTEN="127.0.0.1:$PF_SMTP"
: >"$PF/etc/vmailbox"
for i in $(seq "$NUSERS"); do echo "user$i@example.test example.test/user$i/" >>"$PF/etc/vmailbox"; done
for i in $(seq "$POP3_USERS"); do echo "pop$i@example.test example.test/pop$i/" >>"$PF/etc/vmailbox"; done
echo "remote.test smtp:[$SINK_ADDR]:$SINK_PORT" >"$PF/etc/transport"
if [ "$TLS" = 1 ]; then
    # TLS both ways, as Debian's stock main.cf has it (session caches too).
    cat >>"$PF/etc/main.cf" <<EOF_TLS
smtpd_tls_cert_file = $TLSDIR/cert.pem
smtpd_tls_key_file = $TLSDIR/key.pem
smtpd_tls_security_level = may
smtp_tls_security_level = may
smtpd_tls_session_cache_database = btree:\${data_directory}/smtpd_scache
smtp_tls_session_cache_database = btree:\${data_directory}/smtp_scache
EOF_TLS
fi
log "starting Postfix on 127.0.0.1:$PF_SMTP"
timeout 60 postfix -c "$PF/etc" check >"$WORK/postfix-check.log" 2>&1 ||
    die "postfix check failed: $(cat "$WORK/postfix-check.log"; tail -5 "$PF/maillog" 2>/dev/null)"
cg_make postfix
(cg_enter postfix && exec timeout 60 postfix -c "$PF/etc" start) >"$WORK/postfix-start.log" 2>&1 ||
    die "postfix start failed: $(cat "$WORK/postfix-start.log"; tail -5 "$PF/maillog" 2>/dev/null)"
PF_STARTED=1
wait_port 127.0.0.1 "$PF_SMTP" 30 || die "Postfix smtpd not listening"

# Messages in the Maildirs of example.test, and the newest one's mtime.
maildir_count() { find "$MAIL/example.test" -type f \( -path '*/new/*' -o -path '*/cur/*' \) 2>/dev/null | wc -l; }
maildir_last() { find "$MAIL/example.test" -type f \( -path '*/new/*' -o -path '*/cur/*' \) -printf '%T@\n' | sort -n | tail -1; }

# wait_until COUNT_FN TARGET SECONDS: polls until COUNT_FN prints >= TARGET;
# POLL_START is then the time the successful poll began.
POLL_START=0
wait_until() {
    local deadline=$((SECONDS + $3)) n=0
    while [ $SECONDS -lt "$deadline" ]; do
        POLL_START=$(now)
        n=$($1)
        [ "$n" -ge "$2" ] && return 0
        sleep 0.1
    done
    log "timed out: $1 = $n, wanted $2"
    return 1
}
WAIT=$((60 + MESSAGES / 50))

# smtp_load TOOL PORT RECIPIENT-PATTERN N LABEL: one load, 20 sessions.
smtp_load() {
    local tool=$1 port=$2 rcpt=$3 n=$4 label=$5
    if [ "$tool" = smtp-source ]; then
        # smtp-source has one fixed recipient.
        run_child timeout "$WAIT" smtp-source -c -l "$SIZE" -m "$n" -s "$SESSIONS" -f bench@postino.test \
            -t "${rcpt//\{n\}/1}" "127.0.0.1:$port" >/dev/null
    else
        run_child timeout "$WAIT" "$BENCH" bench smtp --server "127.0.0.1:$port" --sessions "$SESSIONS" \
            --messages "$n" --size "$SIZE" --rcpt-pattern "$rcpt" --rcpt-count "$SESSIONS" \
            --messages-per-session "$PER_SESSION" "${BENCH_TLS[@]}" \
            --json "$OUT/$label.json" --plot "$OUT/$label.svg" >"$OUT/$label.txt"
        cat "$OUT/$label.txt" >&2
    fi
}

# e2e TARGET LOAD TOOL PORT RCPT COUNT_FN LAST_FN: end-to-end rate of one load.
e2e() {
    local target=$1 load=$2 tool=$3 port=$4 rcpt=$5 count_fn=$6 last_fn=$7
    local base t0 t1 last cpu0 cpu1 cpu_note="" conn0 tls0 sink_note=""
    if [ "$TLS" = 1 ] && [ "$tool" = smtp-source ]; then return 0; fi
    base=$($count_fn)
    conn0=$(sink_field connections)
    tls0=$(sink_field tls_sessions)
    cpu0=$(cg_cpu "$target")
    t0=$(now)
    if ! smtp_load "$tool" "$port" "$rcpt" "$MESSAGES" "$target-$load-$tool"; then
        log "$target $load ($tool): load failed"; FAILED=1; return 0
    fi
    t1=$(now)
    if ! wait_until "$count_fn" $((base + MESSAGES)) "$WAIT"; then
        log "$target $load ($tool): not all messages arrived"; FAILED=1; return 0
    fi
    last=$($last_fn)
    cpu1=$(cg_cpu "$target")
    if [ "$count_fn" = sink_count ]; then
        # The stats file is rewritten every second: let it catch up.
        sleep 1.5
        sink_note="; at the sink $(($(sink_field connections) - conn0)) connections, $(($(sink_field tls_sessions) - tls0)) with TLS"
    fi
    if [ -n "$cpu0" ] && [ -n "$cpu1" ]; then
        cpu_note="; server CPU $(fmt0 "($cpu1 - $cpu0) / 1000 / $MESSAGES") µs/msg"
    fi
    # Never earlier than the last 250 (a coarse mtime could say so).
    last=$(awk -v a="$last" -v b="$t1" 'BEGIN { printf "%.6f", (a > b ? a : b) }')
    record "$target" "$load" "$tool" "$MESSAGES" "$(calc "$last - $t0")" \
        "(all 250s after $(printf %.2f "$(calc "$t1 - $t0")") s$cpu_note$sink_note)"
}

rate_of() { awk -F'\t' -v t="$1" -v l="$2" -v o="$3" '$1==t && $2==l && $3==o { print $6 }' "$RESULTS"; }
json_field() { sed -n "s/^ *\"$2\": \([0-9.]*\),\{0,1\}\$/\1/p" "$1" | head -1; }

# half_rate TARGET PORT COUNT_FN: latency from the final dot to the 250 with an
# open-loop load at half the rate smtp-source reached (local delivery), over
# 40 reused connections, for HALF_SECONDS.
HALF_SECONDS=10
half_rate() {
    local target=$1 port=$2 count_fn=$3 full rate n base label=$1-half-rate json
    [ "$TLS" = 0 ] || return 0
    full=$(rate_of "$target" local smtp-source)
    if [ -z "$full" ] || [ "$full" -lt 2 ]; then return 0; fi
    rate=$((full / 2))
    n=$((rate * HALF_SECONDS))
    json=$OUT/$label.json
    base=$($count_fn)
    if run_child timeout $((60 + 2 * HALF_SECONDS)) "$BENCH" bench smtp --server "127.0.0.1:$port" --sessions 40 \
        --messages-per-session 0 --messages "$n" --rate "$rate" --size "$SIZE" \
        --rcpt-pattern 'user{n}@example.test' --rcpt-count "$SESSIONS" \
        --json "$json" --plot "$OUT/$label.svg" >"$OUT/$label.txt"; then
        cat "$OUT/$label.txt" >&2
        record "$target" latency-at-half-rate postino-bench "$(json_field "$json" ok)" \
            "$(json_field "$json" elapsed_s)" \
            "(target $rate/s; p50 $(awk "BEGIN { printf \"%.1f\", $(json_field "$json" p50) / 1000 }") ms, p99 $(awk "BEGIN { printf \"%.1f\", $(json_field "$json" p99) / 1000 }") ms)"
        wait_until "$count_fn" $((base + n)) "$WAIT" || FAILED=1
    else
        log "$target: half-rate load failed"; FAILED=1
    fi
}

if [ "$CLUSTER" = 1 ]; then
    # The cluster loads instead of the rest (same helpers, sink and Postfix).
    . "$TEMPLATES/cluster.sh"
    exit "$FAILED"
fi

log "Postfix: local delivery and relay"
e2e postfix local smtp-source "$PF_SMTP" 'user{n}@example.test' maildir_count maildir_last
e2e postfix local "postino-bench" "$PF_SMTP" 'user{n}@example.test' maildir_count maildir_last
e2e postfix relay smtp-source "$PF_SMTP" 'user{n}@remote.test' sink_count sink_last
e2e postfix relay "postino-bench" "$PF_SMTP" 'user{n}@remote.test' sink_count sink_last
half_rate postfix "$PF_SMTP" maildir_count

# ---------------------------------------------------------------- smtp-sink
if [ "$TLS" = 0 ]; then
log "smtp-sink ceiling on 127.0.0.1:$SMTP_SINK_PORT"
smtp-sink -u "$VUSER" "127.0.0.1:$SMTP_SINK_PORT" 1024 >/dev/null 2>&1 &
PIDS+=($!)
wait_port 127.0.0.1 "$SMTP_SINK_PORT" 10 || die "smtp-sink did not start"
t0=$(now)
if run_child timeout "$WAIT" smtp-source -c -l "$SIZE" -m "$MESSAGES" -s "$SESSIONS" -f bench@postino.test \
    -t user1@remote.test "127.0.0.1:$SMTP_SINK_PORT" >/dev/null; then
    record smtp-sink ceiling smtp-source "$MESSAGES" "$(calc "$(now) - $t0")" "(protocol only)"
else
    log "smtp-source against smtp-sink failed"; FAILED=1
fi
t0=$(now)
if smtp_load postino-bench "$SMTP_SINK_PORT" 'user{n}@remote.test' "$MESSAGES" smtp-sink-ceiling-postino-bench; then
    record smtp-sink ceiling postino-bench "$MESSAGES" "$(calc "$(now) - $t0")" "(protocol only)"
else
    FAILED=1
fi
base=$(sink_count)
t0=$(now)
if run_child timeout "$WAIT" smtp-source -c -l "$SIZE" -m "$MESSAGES" -s "$SESSIONS" -f bench@postino.test \
    -t user1@remote.test "$SINK_ADDR:$SINK_PORT" >/dev/null; then
    t1=$(now)
    # The count file is rewritten every second: wait for it to catch up.
    wait_until sink_count $((base + MESSAGES)) 10 || FAILED=1
    record bench-sink ceiling smtp-source "$MESSAGES" "$(calc "$t1 - $t0")" "(protocol only)"
else
    log "smtp-source against bench sink failed"; FAILED=1
fi
fi

# ---------------------------------------------------------------- POP3
# pop3_run TARGET PORT: fill 21 mailboxes with POP3_MESSAGES ~2 KiB messages
# each (through the target's own SMTP), one untimed pass, then timed passes.
pop3_run() {
    local target=$1 pop_port=$2 smtp_port=$3 count_fn=$4
    local n=$((POP3_USERS * POP3_MESSAGES)) base label=$1-pop3
    [ "$TLS" = 0 ] || return 0
    base=$($count_fn)
    log "$target: filling $POP3_USERS mailboxes with $POP3_MESSAGES messages each"
    run_child timeout $((60 + n / 50)) "$BENCH" bench smtp --server "127.0.0.1:$smtp_port" --sessions "$SESSIONS" \
        --messages "$n" --size "$POP3_SIZE" --rcpt-pattern 'pop{n}@example.test' \
        --rcpt-count "$POP3_USERS" --messages-per-session 0 >/dev/null ||
        { log "$target: fill failed"; FAILED=1; return 0; }
    wait_until "$count_fn" $((base + n)) $((60 + n / 50)) || { FAILED=1; return 0; }
    # Warm-up: the first login to a Maildir builds Dovecot's index and uidlist.
    run_child timeout 600 "$BENCH" bench pop3 --server "127.0.0.1:$pop_port" --sessions "$POP3_USERS" \
        --user-pattern 'pop{n}@example.test' --users "$POP3_USERS" --password password >/dev/null ||
        { log "$target: POP3 warm-up failed"; FAILED=1; return 0; }
    if run_child timeout 600 "$BENCH" bench pop3 --server "127.0.0.1:$pop_port" --sessions "$POP3_USERS" \
        --logins $((POP3_USERS * POP3_ROUNDS)) --user-pattern 'pop{n}@example.test' \
        --users "$POP3_USERS" --password password \
        --json "$OUT/$label.json" --plot "$OUT/$label.svg" >"$OUT/$label.txt"; then
        cat "$OUT/$label.txt" >&2
        local ok secs
        ok=$(sed -n 's/^  "ok": \([0-9]*\),$/\1/p' "$OUT/$label.json")
        secs=$(sed -n 's/^  "elapsed_s": \([0-9.]*\),$/\1/p' "$OUT/$label.json")
        record "$target" pop3 postino-bench "$ok" "$secs" "(RETR, $POP3_USERS sessions)"
    else
        log "$target: POP3 load failed"; FAILED=1
    fi
}

log "starting Dovecot POP3 on 127.0.0.1:$DV_POP3"
DV=$WORK/dovecot
mkdir -p "$DV/run" "$DV/state"
fill "$TEMPLATES/dovecot.conf" "$DV/dovecot.conf" DV="$DV" MAIL="$MAIL" UID="$VUID" GID="$VGID" PORT="$DV_POP3"
: >"$DV/users"
for i in $(seq "$POP3_USERS"); do echo "pop$i@example.test:{PLAIN}password" >>"$DV/users"; done
DV_PID_FILE=$DV/run/master.pid
timeout 30 dovecot -c "$DV/dovecot.conf" || die "dovecot did not start: $(tail -5 "$DV/dovecot.log" 2>/dev/null)"
wait_port 127.0.0.1 "$DV_POP3" 30 || die "Dovecot not listening"
pop3_run dovecot "$DV_POP3" "$PF_SMTP" maildir_count

# ---------------------------------------------------------------- postino
POSTINO_STATUS=skipped
postino_count() {
    local total=0 i c
    for i in $(seq "$SESSIONS"); do
        c=$(pop3_stat "$PN_POP3" "user$i@example.test" password) || c=0
        total=$((total + c))
    done
    echo "$total"
}
postino_pop_count() {
    local total=0 i c
    for i in $(seq "$POP3_USERS"); do
        c=$(pop3_stat "$PN_POP3" "pop$i@example.test" password) || c=0
        total=$((total + c))
    done
    echo "$total"
}
# postino answers 250 only once a message is stored, so the first complete
# poll after the load shows when delivery ended (to within that poll).
postino_last() { echo "$POLL_START"; }

if [ "$WITH_POSTINO" = 0 ]; then
    log "postino: skipped (--no-postino)"
elif [ ! -x "$POSTINO" ]; then
    log "postino: skipped ($POSTINO not built; cargo build --release -p postino-cli)"
elif ! "$POSTINO" serve --help >/dev/null 2>&1 || ! "$POSTINO" user add --help >/dev/null 2>&1; then
    log "postino: skipped ($POSTINO has no serve / user add command yet)"
else
    PN=$WORK/postino
    mkdir -p "$PN"
    fill "$TEMPLATES/postino.toml" "$PN/postino.toml" PN="$PN" SMTP_PORT="$PN_SMTP" \
        POP3_PORT="$PN_POP3" SINK_PORT="$SINK_PORT"
    if [ "$TLS" = 1 ]; then
        printf '\n[tls]\ncert = "%s"\nkey = "%s"\n' "$TLSDIR/cert.pem" "$TLSDIR/key.pem" >>"$PN/postino.toml"
        # The script counts delivered mail with POP3 STAT in clear over
        # loopback, which postino refuses once it has TLS unless told.
        sed -i 's/^\[smtp\]$/[smtp]\nallow_plaintext_auth = true/' "$PN/postino.toml"
    fi
    POSTINO_STATUS=ok
    # Only `postino serve` creates a store: start it, then add the users
    # through its control socket.
    log "starting postino on 127.0.0.1:$PN_SMTP (POP3 $PN_POP3)"
    cg_make postino
    # $! must be postino itself: the subshell enters the cgroup, then execs.
    { cg_enter postino; exec "$POSTINO" --config "$PN/postino.toml" serve; } >"$PN/serve.log" 2>&1 &
    PIDS+=($!)
    if ! wait_port 127.0.0.1 "$PN_SMTP" 30 || ! wait_port 127.0.0.1 "$PN_POP3" 10; then
        log "postino: serve did not listen: $(tail -5 "$PN/serve.log")"
        POSTINO_STATUS=failed
    fi
    if [ "$POSTINO_STATUS" = ok ]; then
        for i in $(seq "$NUSERS"); do
            echo password | timeout 30 "$POSTINO" --config "$PN/postino.toml" user add "user$i@example.test" \
                >>"$PN/users.log" 2>&1 || POSTINO_STATUS=failed
        done
        for i in $(seq "$POP3_USERS"); do
            echo password | timeout 30 "$POSTINO" --config "$PN/postino.toml" user add "pop$i@example.test" \
                >>"$PN/users.log" 2>&1 || POSTINO_STATUS=failed
        done
        [ "$POSTINO_STATUS" = ok ] || log "postino: user add failed: $(tail -3 "$PN/users.log")"
    fi
    if [ "$POSTINO_STATUS" = ok ]; then
        e2e postino local smtp-source "$PN_SMTP" 'user{n}@example.test' postino_count postino_last
        e2e postino local "postino-bench" "$PN_SMTP" 'user{n}@example.test' postino_count postino_last
        e2e postino relay smtp-source "$PN_SMTP" 'user{n}@remote.test' sink_count sink_last
        e2e postino relay "postino-bench" "$PN_SMTP" 'user{n}@remote.test' sink_count sink_last
        if [ "$TLS" = 1 ]; then
            # The same relay with outbound connection reuse off: a TCP
            # connection and a TLS handshake per message on both sides.
            printf '\n[delivery]\nconnection_reuse = false\n' >>"$PN/postino.toml"
            if timeout 30 "$POSTINO" --config "$PN/postino.toml" reload >>"$PN/reload.log" 2>&1; then
                e2e postino relay-no-reuse "postino-bench" "$PN_SMTP" 'user{n}@remote.test' sink_count sink_last
            else
                log "postino: reload with connection_reuse = false failed: $(tail -2 "$PN/reload.log")"
                FAILED=1
            fi
        fi
        half_rate postino "$PN_SMTP" postino_count
        pop3_run postino "$PN_POP3" "$PN_SMTP" postino_pop_count
    fi
    [ "$POSTINO_STATUS" = ok ] || FAILED=1
fi

# ---------------------------------------------------------------- summary
{
    echo
    echo "## Results ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $MESSAGES messages of $SIZE octets, $SESSIONS sessions)"
    echo
    echo "| target | load | client | messages | seconds | per second | note |"
    echo "|---|---|---|---:|---:|---:|---|"
    tail -n +2 "$RESULTS" | awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5, $6, $7 }'
    echo
    if [ "$POSTINO_STATUS" = ok ]; then
        echo "| ratio postino / reference | value | target |"
        echo "|---|---:|---:|"
        ratio() {
            local a b
            a=$(rate_of postino "$1" "$2"); b=$(rate_of "$3" "$4" "$5")
            if [ -n "$a" ] && [ -n "$b" ] && [ "$b" != 0 ]; then
                echo "| $6 | $(awk "BEGIN { printf \"%.2f\", $a / $b }")× | $7 |"
            fi
        }
        ratio local smtp-source postfix local smtp-source "local delivery vs Postfix (smtp-source)" "≥ 5×"
        ratio local smtp-source smtp-sink ceiling smtp-source "local delivery vs smtp-sink ceiling" "≥ 0.5×"
        ratio relay smtp-source postfix relay smtp-source "relay vs Postfix (smtp-source)" "≥ 5×"
        ratio pop3 postino-bench dovecot pop3 postino-bench "POP3 RETR vs Dovecot" "≥ 1.5×"
        ratio local postino-bench postfix local postino-bench "local delivery vs Postfix (postino bench)" ""
        ratio relay postino-bench postfix relay postino-bench "relay vs Postfix (postino bench)" ""
        ratio relay-no-reuse postino-bench postfix relay postino-bench "relay, postino without connection reuse, vs Postfix" ""
    else
        echo "postino: $POSTINO_STATUS (no ratios)"
    fi
} | tee "$OUT/results.md"
log "results in $OUT (results.md, results.tsv, JSON reports and SVG plots)"
exit "$FAILED"
