# scripts/compare/cluster.sh: the loads of `scripts/compare.sh --cluster`
# (issue 13, "Numbers"). Sourced by compare.sh once its helpers are defined
# and the bench sink and Postfix run; not a script of its own.
#
# In one run, local delivery and relay (20 sessions of 1 KiB by default,
# `postino bench smtp`, counted end to end) against:
#   postfix     Postfix, as compare.sh sets it up
#   sled        one postino node on its embedded sled store
#   pg-1/2/3    1, 2 and 3 postino nodes sharing one PostgreSQL (a fresh
#               database each), the load spread evenly over the nodes' ports
#               (one `bench smtp` per node, in parallel, the sessions split)
# PostgreSQL is a throwaway cluster (initdb as the `postgres` user in the
# work directory, a free loopback port, pg_stat_statements preloaded), with
# its default durability (fsync, synchronous_commit = on).
#
# Per load: the rate; CPU per message of the servers (all nodes together)
# and of PostgreSQL (all its processes), from cpuacct cgroups; for the
# PostgreSQL runs, per message: statements (pg_stat_statements calls,
# BEGIN/COMMIT included), transactions (pg_stat_database xact_commit), WAL
# writes and fsyncs (pg_stat_wal wal_write, wal_sync); and what the nodes'
# sessions waited on (pg_stat_activity sampled every 0.2 s, with the count
# of ungranted pg_locks). The statements of each load, most frequent first,
# (calls, milliseconds executing, text) are in
# OUT/cluster-<config>-<load>-statements.txt and the wait samples in
# OUT/cluster-<config>-<load>-waits.txt.
#
# The script's own queries run as the role `monitor` (left out of the
# statement counts); its polls of the mail table (to see local delivery
# end) are counted and taken off xact_commit. PostgreSQL's backends publish
# their counters at most every second and, once idle, within 10 s: every
# PostgreSQL load ends with a STATS_SETTLE (11 s) wait before the counters
# are read (the rate and CPU are taken before it).

[ "$TLS" = 0 ] || die "--cluster does not combine with --tls"

PG_BIN=""
for v in 17 16 15; do
    if [ -x "/usr/lib/postgresql/$v/bin/initdb" ]; then PG_BIN=/usr/lib/postgresql/$v/bin; break; fi
done
if [ -z "$PG_BIN" ]; then
    log "installing postgresql from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    timeout 600 apt-get install -y postgresql >/dev/null ||
        { timeout 600 apt-get update >/dev/null && timeout 600 apt-get install -y postgresql >/dev/null; } ||
        die "cannot install postgresql"
    for v in 17 16 15; do
        if [ -x "/usr/lib/postgresql/$v/bin/initdb" ]; then PG_BIN=/usr/lib/postgresql/$v/bin; break; fi
    done
    [ -n "$PG_BIN" ] || die "postgresql installed but no initdb under /usr/lib/postgresql"
fi
id postgres >/dev/null 2>&1 || die "no postgres user (Debian's postgresql package creates it)"

STATS_SETTLE=${STATS_SETTLE:-11}
PG_PORT=$((PORT_BASE + 9))
node_smtp() { echo $((PORT_BASE + 10 + 2 * $1)); }
node_pop3() { echo $((PORT_BASE + 11 + 2 * $1)); }
for p in $PG_PORT $(node_smtp 1) $(node_pop3 1) $(node_smtp 2) $(node_pop3 2) $(node_smtp 3) $(node_pop3 3); do
    port_free 127.0.0.1 "$p" || die "port 127.0.0.1:$p is in use (set PORT_BASE)"
done
[ "$WITH_POSTINO" = 1 ] || die "--cluster needs postino (no --no-postino)"
[ -x "$POSTINO" ] || die "no $POSTINO: cargo build --release -p postino-cli (or --build)"

CRESULTS=$OUT/cluster.tsv
printf 'config\tload\tnodes\tmessages\tseconds\tper_second\tloadavg\tserver_us\tpg_us\tstatements\ttransactions\twal_writes\twal_fsyncs\twaits\n' >"$CRESULTS"

# ------------------------------------------------------------ PostgreSQL
PG_DIR=$WORK/pg
PG_PID=""
cluster_cleanup() {
    # Interrupted in a load: the sampler ends at its stop file.
    declare -F sampler_stop >/dev/null && sampler_stop
    if [ -n "$PG_PID" ]; then
        # Fast shutdown (SIGINT): sessions cut, a checkpoint, out.
        kill -INT "$PG_PID" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$PG_PID" 2>/dev/null || break; sleep 0.1; done
        kill -QUIT "$PG_PID" 2>/dev/null
    fi
}
as_postgres() { setpriv --reuid postgres --regid postgres --clear-groups -- "$@"; }
# psql_mon DB SQL: one query as the monitoring role, unaligned, no header.
psql_mon() { "$PG_BIN/psql" -X -q -At -h 127.0.0.1 -p "$PG_PORT" -U monitor -d "$1" -c "$2"; }

mkdir -p "$PG_DIR"
chown postgres "$PG_DIR"
log "initdb in $PG_DIR ($PG_BIN)"
as_postgres "$PG_BIN/initdb" -A trust -U postgres -E UTF8 --no-sync -D "$PG_DIR/data" >"$WORK/initdb.log" 2>&1 ||
    die "initdb failed: $(tail -5 "$WORK/initdb.log")"
cg_make pg
{ cg_enter pg; exec setpriv --reuid postgres --regid postgres --clear-groups -- "$PG_BIN/postgres" \
    -D "$PG_DIR/data" -p "$PG_PORT" -k "$PG_DIR" -c listen_addresses=127.0.0.1 \
    -c max_connections=200 -c shared_preload_libraries=pg_stat_statements \
    -c pg_stat_statements.track_utility=on -c pg_stat_statements.max=1000; } >"$PG_DIR/server.log" 2>&1 &
PG_PID=$!
for _ in $(seq 600); do
    "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" && break
    kill -0 "$PG_PID" 2>/dev/null || die "postgres exited: $(tail -5 "$PG_DIR/server.log")"
    sleep 0.1
done
"$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" || die "PostgreSQL did not start: $(tail -5 "$PG_DIR/server.log")"
"$PG_BIN/psql" -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres \
    -c "CREATE ROLE monitor SUPERUSER LOGIN" -c "CREATE EXTENSION pg_stat_statements" >/dev/null ||
    die "cannot set up the monitoring role"
log "PostgreSQL $("$PG_BIN/postgres" --version | awk '{ print $3 }') on 127.0.0.1:$PG_PORT"

# pg_counters DB: "xact_commit wal_write wal_sync" now.
pg_counters() {
    psql_mon postgres "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = '$1'),
        wal_write, wal_sync FROM pg_stat_wal" | tr '|' ' '
}
# Statements run in DB by anyone but the monitor since the last reset,
# most frequent first (calls|total milliseconds executing|text), into
# FILE; prints the number of calls.
pg_statements() {
    local db=$1 file=$2
    psql_mon postgres "SELECT s.calls, round(s.total_exec_time::numeric, 1),
            regexp_replace(left(s.query, 160), '\s+', ' ', 'g')
        FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid
        WHERE d.datname = '$db' AND s.userid <> 'monitor'::regrole ORDER BY s.calls DESC" >"$file"
    awk -F'|' '{ n += $1 } END { print n + 0 }' "$file"
}
# The sampler: what the nodes' sessions do, every 0.2 s, through one psql
# session (the loop feeds it queries until the stop file appears).
SAMPLER=""
sampler_start() {
    local db=$1 file=$2
    rm -f "$WORK/sampler.stop"
    {
        while [ ! -e "$WORK/sampler.stop" ]; do
            echo "SELECT 'session ' || replace(state, ' ', '_') || ' ' || coalesce(wait_event_type, 'CPU') || ':' ||
                coalesce(wait_event, '-') FROM pg_stat_activity
                WHERE datname = '$db' AND usename <> 'monitor' AND state <> 'idle'
                UNION ALL SELECT 'lock-waits ' || count(*) FROM pg_locks WHERE NOT granted
                UNION ALL SELECT 'sample';"
            sleep 0.2
        done
    } | "$PG_BIN/psql" -X -q -At -h 127.0.0.1 -p "$PG_PORT" -U monitor -d postgres >"$file" 2>&1 &
    SAMPLER=$!
}
sampler_stop() {
    [ -n "$SAMPLER" ] || return 0
    : >"$WORK/sampler.stop"
    wait "$SAMPLER" 2>/dev/null || true
    SAMPLER=""
}
# waits_summary FILE: "N samples; the most frequent states/waits per sample".
waits_summary() {
    awk '/^sample$/ { n++ } /^session / { sub(/^session /, ""); w[$0]++ }
        /^lock-waits / { l += $2 }
        END {
            if (n == 0) { print "no samples"; exit }
            out = ""
            for (k in w) out = out sprintf("%s %.1f\n", k, w[k] / n)
            printf "%s", out > "/dev/stderr"
            printf "%d samples, ungranted locks %.2f", n, l / n
        }' "$1" 2>"$1.summary"
    sort -k3 -gr "$1.summary" | head -4 | awk '{ printf "; %s %s %s", $1, $2, $3 }'
}

# ------------------------------------------------------------ the loads
DB=""            # the database of the PostgreSQL configuration running
POLLS=$WORK/polls
: >"$POLLS"
pg_mail_count() {
    echo >>"$POLLS"
    psql_mon "$DB" "SELECT count(*) FROM mail" 2>/dev/null || echo 0
}
polls() { wc -l <"$POLLS"; }

# spread LOAD RCPT-PATTERN PORT...: MESSAGES over the ports, SESSIONS split,
# one `bench smtp` each, in parallel.
spread() {
    local label=$1 rcpt=$2 n=$(($# - 2)) i=0 port share sessions pids=() rc=0
    shift 2
    for port in "$@"; do
        i=$((i + 1))
        share=$((MESSAGES / n))
        [ "$i" -lt "$n" ] || share=$((MESSAGES - (n - 1) * (MESSAGES / n)))
        sessions=$((SESSIONS / n > 0 ? SESSIONS / n : 1))
        timeout "$WAIT" "$BENCH" bench smtp --server "127.0.0.1:$port" --sessions "$sessions" \
            --messages "$share" --size "$SIZE" --rcpt-pattern "$rcpt" --rcpt-count "$SESSIONS" \
            --json "$OUT/cluster-$label-$i.json" >"$OUT/cluster-$label-$i.txt" 2>&1 &
        pids+=($!)
    done
    for i in "${pids[@]}"; do wait "$i" || rc=1; done
    return "$rc"
}

# cluster_e2e CONFIG LOAD SERVER-CGROUP COUNT_FN PORT...: one load end to
# end; with DB set, the PostgreSQL counters too.
cluster_e2e() {
    local config=$1 load=$2 cg=$3 count_fn=$4 rcpt
    shift 4
    local nodes=$# base t0 t1 loadavg s0 s1 p0 p1 c0 c1 polls0 stmts="" waits="" label=$1
    label=$config-$load
    [ "$load" = local ] && rcpt='user{n}@example.test' || rcpt='user{n}@remote.test'
    loadavg=$(cut -d' ' -f1 /proc/loadavg)
    base=$($count_fn)
    if [ -n "$DB" ]; then
        psql_mon postgres "SELECT pg_stat_statements_reset()" >/dev/null
        read -r -a c0 <<<"$(pg_counters "$DB")"
        polls0=$(polls)
        sampler_start "$DB" "$OUT/cluster-$label-waits.txt"
    fi
    s0=$(cg_cpu "$cg")
    p0=$(cg_cpu pg)
    t0=$(now)
    if ! run_child spread "$label" "$rcpt" "$@"; then
        sampler_stop
        log "$config $load: load failed: $(tail -2 "$OUT/cluster-$label-"*.txt)"; FAILED=1; return 0
    fi
    t1=$(now)
    if ! wait_until "$count_fn" $((base + MESSAGES)) "$WAIT"; then
        sampler_stop
        log "$config $load: not all messages arrived"; FAILED=1; return 0
    fi
    local last=$POLL_START
    [ "$count_fn" = sink_count ] && last=$(awk -v a="$(sink_last)" -v b="$t1" 'BEGIN { printf "%.6f", (a > b ? a : b) }')
    s1=$(cg_cpu "$cg")
    p1=$(cg_cpu pg)
    local secs server_us="" pg_us="" tx="" ww="" ws=""
    secs=$(calc "$last - $t0")
    [ -n "$s0" ] && [ -n "$s1" ] && server_us=$(fmt0 "($s1 - $s0) / 1000 / $MESSAGES")
    if [ -n "$DB" ]; then
        sampler_stop
        [ -n "$p0" ] && [ -n "$p1" ] && pg_us=$(fmt0 "($p1 - $p0) / 1000 / $MESSAGES")
        sleep "$STATS_SETTLE"
        read -r -a c1 <<<"$(pg_counters "$DB")"
        stmts=$(pg_statements "$DB" "$OUT/cluster-$label-statements.txt")
        tx=$(calc "(${c1[0]} - ${c0[0]} - ($(polls) - $polls0)) / $MESSAGES")
        ww=$(calc "(${c1[1]} - ${c0[1]}) / $MESSAGES")
        ws=$(calc "(${c1[2]} - ${c0[2]}) / $MESSAGES")
        stmts=$(calc "$stmts / $MESSAGES")
        waits=$(waits_summary "$OUT/cluster-$label-waits.txt")
    fi
    printf '%s\t%s\t%s\t%s\t%.3f\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$config" "$load" "$nodes" "$MESSAGES" \
        "$secs" "$(fmt0 "$MESSAGES / $secs")" "$loadavg" "$server_us" "$pg_us" "$stmts" "$tx" "$ww" "$ws" \
        "$waits" >>"$CRESULTS"
    log "$config $load: $MESSAGES in $(printf %.2f "$secs") s = $(fmt0 "$MESSAGES / $secs")/s" \
        "(load $loadavg; server ${server_us:-?} µs/msg${pg_us:+, PostgreSQL $pg_us µs/msg}${stmts:+, $stmts statements, $tx transactions, $ww WAL writes, $ws WAL fsyncs per message}${waits:+; $waits})"
}

# ------------------------------------------------------------ Postfix
log "cluster: Postfix"
cluster_e2e postfix local postfix maildir_count "$PF_SMTP"
cluster_e2e postfix relay postfix sink_count "$PF_SMTP"
# Postfix is done: stop it, so that it takes no CPU from the others.
timeout 60 postfix -c "$PF/etc" stop >/dev/null 2>&1 && PF_STARTED=0

# ------------------------------------------------------------ sled
PN=$WORK/postino
mkdir -p "$PN"
fill "$TEMPLATES/postino.toml" "$PN/postino.toml" PN="$PN" SMTP_PORT="$PN_SMTP" \
    POP3_PORT="$PN_POP3" SINK_PORT="$SINK_PORT"
log "cluster: one node on sled (127.0.0.1:$PN_SMTP)"
cg_make postino
{ cg_enter postino; exec "$POSTINO" --config "$PN/postino.toml" serve; } >"$PN/serve.log" 2>&1 &
SLED_PID=$!
PIDS+=("$SLED_PID")
wait_port 127.0.0.1 "$PN_SMTP" 30 && wait_port 127.0.0.1 "$PN_POP3" 10 ||
    die "postino (sled) did not listen: $(tail -5 "$PN/serve.log")"
for i in $(seq "$SESSIONS"); do
    echo password | timeout 30 "$POSTINO" --config "$PN/postino.toml" user add "user$i@example.test" \
        >>"$PN/users.log" 2>&1 || die "user add failed: $(tail -3 "$PN/users.log")"
done
postino_count() {
    local total=0 i c
    for i in $(seq "$SESSIONS"); do
        c=$(pop3_stat "$PN_POP3" "user$i@example.test" password) || c=0
        total=$((total + c))
    done
    echo "$total"
}
cluster_e2e sled local postino postino_count "$PN_SMTP"
cluster_e2e sled relay postino sink_count "$PN_SMTP"
kill "$SLED_PID"
wait "$SLED_PID" 2>/dev/null || true
# The users' password hash, for the PostgreSQL databases (the nodes have
# no `user add` on PostgreSQL yet).
timeout 60 "$POSTINO" --config "$PN/postino.toml" store export -o "$WORK/sled.jsonl" 2>>"$PN/users.log" ||
    die "store export failed: $(tail -2 "$PN/users.log")"
HASH=$(/usr/bin/python3 -c 'import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("type") == "user":
        print(r["hash"]); break' "$WORK/sled.jsonl")
[ -n "$HASH" ] || die "no user in the sled export"

# ------------------------------------------------------------ PostgreSQL nodes
cg_make nodes
NODE_PIDS=()
pg_nodes() {
    local n=$1 i dir
    DB=cluster$n
    psql_mon postgres "CREATE DATABASE $DB" >/dev/null || die "CREATE DATABASE $DB failed"
    for i in $(seq "$n"); do
        dir=$WORK/node$n-$i
        mkdir -p "$dir"
        fill "$TEMPLATES/postino.toml" "$dir/postino.toml" PN="$dir" SMTP_PORT="$(node_smtp "$i")" \
            POP3_PORT="$(node_pop3 "$i")" SINK_PORT="$SINK_PORT"
        printf '\n[store]\nbackend = "postgres"\nurl = "postgresql://postgres@127.0.0.1:%s/%s"\nnode = "n%s"\n' \
            "$PG_PORT" "$DB" "$i" >>"$dir/postino.toml"
        { cg_enter nodes; exec "$POSTINO" --config "$dir/postino.toml" serve; } >"$dir/serve.log" 2>&1 &
        NODE_PIDS+=($!)
        PIDS+=($!)
        # One at a time: the first creates the schema.
        wait_port 127.0.0.1 "$(node_smtp "$i")" 60 || die "node $i of $n did not listen: $(tail -5 "$dir/serve.log")"
    done
    psql_mon "$DB" "INSERT INTO users (address, hash)
        SELECT 'user' || g || '@example.test', '$HASH' FROM generate_series(1, $SESSIONS) g" >/dev/null ||
        die "adding users to $DB failed"
}
pg_nodes_stop() {
    local pid
    for pid in "${NODE_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${NODE_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    NODE_PIDS=()
    DB=""
}
for n in 1 2 3; do
    log "cluster: $n node(s) on PostgreSQL"
    pg_nodes "$n"
    ports=()
    for i in $(seq "$n"); do ports+=("$(node_smtp "$i")"); done
    cluster_e2e "pg-$n" local nodes pg_mail_count "${ports[@]}"
    cluster_e2e "pg-$n" relay nodes sink_count "${ports[@]}"
    pg_nodes_stop
done

# ------------------------------------------------------------ summary
{
    echo
    echo "## Cluster ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $MESSAGES messages of $SIZE octets, $SESSIONS sessions)"
    echo
    echo "Per message: CPU in µs (servers: all nodes; PostgreSQL: all its processes), statements,"
    echo "transactions, WAL writes and fsyncs. Load: the 1-minute load average when the load began."
    echo
    echo "| config | load | nodes | msg/s | load avg | server CPU | PG CPU | statements | transactions | WAL writes | WAL fsyncs |"
    echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    tail -n +2 "$CRESULTS" | awk -F'\t' '{ printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n",
        $1, $2, $3, $6, $7, $8, ($9 == "" ? "–" : $9), ($10 == "" ? "–" : sprintf("%.2f", $10)),
        ($11 == "" ? "–" : sprintf("%.3f", $11)), ($12 == "" ? "–" : sprintf("%.3f", $12)),
        ($13 == "" ? "–" : sprintf("%.3f", $13)) }'
    echo
    echo "What PostgreSQL's sessions were doing (mean sessions per 0.2 s sample, top 4):"
    echo
    tail -n +2 "$CRESULTS" | awk -F'\t' '$14 != "" { printf "- %s %s: %s\n", $1, $2, $14 }'
} | tee "$OUT/cluster.md"
log "results in $OUT (cluster.md, cluster.tsv, per-load statements and wait samples)"
