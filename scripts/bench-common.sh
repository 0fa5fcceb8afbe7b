# Shared by scripts/bench and scripts/bench-sustained: settings, the release build, and helpers
# that start the service, drive load and measure the pgbench ceiling.
# shellcheck source=scripts/services.sh
source scripts/services.sh

SECONDS_PER_PHASE=${BENCH_SECONDS:-15}
CONNECTIONS=${BENCH_CONNECTIONS:-64}
SECRET=bench-secret-0123456789
TARGET_DIR=${CARGO_TARGET_DIR:-target}
RUN_ID=$(date -u +%Y%m%dT%H%M%SZ)
OUT=$TARGET_DIR/bench/$RUN_ID
mkdir -p "$OUT"

ensure_build_tools
ensure_postgres
ensure_broker
command -v pgbench >/dev/null || apt_install postgresql-contrib
command -v jq >/dev/null || apt_install jq

log "building (release)"
# One build: the service, the load generator (bench/loadgen) and the two baseline examples.
cargo build --release --quiet -p acme-webhooks -p loadgen -p relay --bins --examples
# BENCH_BIN: another build of the service to measure (e.g. an older tree's, for a paired run).
BIN=${BENCH_BIN:-$TARGET_DIR/release/acme-webhooks}
LOADGEN=$TARGET_DIR/release/loadgen

# The broker's processes: whatever listens on the ports of ACME_TEST_KAFKA_BROKERS.
broker_pids() {
  local port
  for port in $(tr ',' '\n' <<<"$ACME_TEST_KAFKA_BROKERS" | sed 's/.*://'); do
    ss -ltnpH "sport = :$port" | grep -o 'pid=[0-9]*' | cut -d= -f2
  done | sort -u
}

# PostgreSQL's postmaster: whatever listens on the port of ACME_TEST_DATABASE_URL.
postmaster_pid() {
  local port
  port=$(sed -E 's|.*:([0-9]+)/.*|\1|' <<<"$ACME_TEST_DATABASE_URL")
  ss -ltnpH "sport = :$port" | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2
}

fresh_db() { # name -> URL
  local base=${ACME_TEST_DATABASE_URL%/*}
  psql "$ACME_TEST_DATABASE_URL" -qc "DROP DATABASE IF EXISTS $1" -c "CREATE DATABASE $1" >/dev/null
  echo "$base/$1"
}

# Runs the service with the given role in the background; sets SERVICE_PID. Topics and group are
# named after the run too, so runs against a long-lived broker never read each other's topics.
start_service() { # role db_url port prefix
  ACME_WEBHOOKS_DATABASE__URL=$2 ACME_WEBHOOKS_HTTP__BIND=127.0.0.1:${3:-0} \
    ACME_WEBHOOKS_WEBHOOK__SECRETS=$SECRET ACME_WEBHOOKS_KAFKA__BROKERS=$ACME_TEST_KAFKA_BROKERS \
    ACME_WEBHOOKS_KAFKA__TOPIC_PREFIX=$RUN_ID.$4 ACME_WEBHOOKS_KAFKA__GROUP_ID=$RUN_ID.$4 \
    ACME_WEBHOOKS_DATABASE__MAX_CONNECTIONS=32 ACME_WEBHOOKS_LOG__FILTER=warn \
    "$BIN" $1 >"$OUT/service-$4.log" 2>&1 &
  SERVICE_PID=$!
  if [ -n "$3" ] && [ "$1" != relay ]; then
    wait_for_port "$3" 60 || { tail -n 20 "$OUT/service-$4.log" >&2; exit 1; }
  fi
}

stop_service() { # pid -> prints its peak RSS in MB
  local hwm
  hwm=$(awk '/VmHWM/ {print $2}' "/proc/$1/status")
  kill -TERM "$1"
  wait "$1" || true
  echo $((hwm / 1024))
}

loadgen() { # name url args...
  local name=$1 url=$2
  shift 2
  "$LOADGEN" --url "$url" --secret "$SECRET" --quiet --json "$OUT/$name.json" "$@" \
    >"$OUT/$name.txt"
  cat "$OUT/$name.txt" >&2
}

# pgbench with the service's per-event transaction (best of 4/8/16 clients): the durable
# ceiling without batching. Sets best_pgbench (and PGB_URL, PAYLOAD for `pgbench_best`); writes
# $OUT/pgbench.txt.
pgbench_ceiling() {
  PGB_URL=$(fresh_db acme_bench_pgbench)
  ACME_WEBHOOKS_DATABASE__URL=$PGB_URL "$BIN" migrate >/dev/null
  PAYLOAD=$(jq -c . <<'JSON'
{"event":"contact.updated","id":"evt_x","timestamp":"2026-11-29T00:00:00Z","data":{"id":"contact-1",
"email":"jane.doe@example.com","firstName":"Jane","lastName":"Doe","phone":"+1 555 0100",
"company":"Example Corp","jobTitle":"Head of Operations","updatedAt":"2026-11-29T00:00:00Z",
"tags":["customer","newsletter"],"address":{"street":"1 Main Street","city":"Springfield",
"postalCode":"12345","country":"US"}}}
JSON
  )
  best_pgbench=$(pgbench_best bench/pgbench-per-event.sql "$OUT/pgbench.txt")
}

pgbench_best() { # script results-file -> prints the best rate of 4/8/16 clients
  local best=0 clients tps
  for clients in 4 8 16; do
    tps=$(pgbench -n -M prepared -c "$clients" -j 2 -T "$SECONDS_PER_PHASE" -D "payload=$PAYLOAD" \
      -f "$1" "$PGB_URL" 2>/dev/null |
      awk '/^tps/ {print int($3)}')
    log "  pgbench $clients clients ($1): $tps events/s"
    echo "$clients $tps" >>"$2"
    if [ "$tps" -gt "$best" ]; then best=$tps; fi
  done
  echo "$best"
}
