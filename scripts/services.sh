# Shared by scripts/test and scripts/bench: find, install or start what the tests need.
# Every function exports what it found; whatever it started is stopped when the shell exits.

TANSU_VERSION=0.6.0
CLEANUP=()
cleanup() {
  local i
  for ((i = ${#CLEANUP[@]} - 1; i >= 0; i--)); do eval "${CLEANUP[$i]}" || true; done
}
trap cleanup EXIT

log() { printf '\033[1m[services]\033[0m %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    log "need root to run: $*"; return 1; fi
}

APT_UPDATED=
apt_install() {
  command -v apt-get >/dev/null || { log "cannot install $* (no apt-get): install it by hand"; return 1; }
  if [ -z "$APT_UPDATED" ]; then as_root apt-get update -qq; APT_UPDATED=1; fi
  log "installing $*"
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_for_port() { # port seconds
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# A C toolchain, make and the headers rdkafka's bundled librdkafka builds against.
ensure_build_tools() {
  local missing=()
  command -v cc >/dev/null || missing+=(build-essential)
  command -v make >/dev/null || missing+=(make)
  command -v pkg-config >/dev/null || missing+=(pkg-config)
  command -v python3 >/dev/null || missing+=(python3)
  [ -e /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
  [ -e /usr/include/zlib.h ] || missing+=(zlib1g-dev)
  if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
}

# cargo-nextest from source: crates.io carries no prebuilt binary and its release downloads are
# out of reach here. About 4.5 minutes on 2 cores (4 min 18 s for 0.9.151), once per machine.
ensure_nextest() {
  cargo nextest --version >/dev/null 2>&1 && return 0
  log "installing cargo-nextest (about 4.5 minutes on 2 cores, once)"
  cargo install cargo-nextest --locked
}

# Headless Chromium for the tests that render the Swagger UI and the console (Debian's `chromium`
# package).
# Exports ACME_TEST_CHROMIUM.
ensure_chromium() {
  local chromium=${ACME_TEST_CHROMIUM:-}
  [ -z "$chromium" ] && chromium=$(command -v chromium || command -v chromium-browser || true)
  if [ -z "$chromium" ]; then
    apt_install chromium
    chromium=$(command -v chromium)
  fi
  export ACME_TEST_CHROMIUM=$chromium
}

# playwright-core from npm (it drives the Chromium above; it downloads no browser of its own),
# for the console's browser tests (tests/console/driver.mjs), in ~/.cache/acme-webhooks (installing
# Debian's nodejs and npm when missing). Exports ACME_TEST_PLAYWRIGHT_DIR.
PLAYWRIGHT_VERSION=1.65.1
ensure_playwright() {
  if [ -n "${ACME_TEST_PLAYWRIGHT_DIR:-}" ] && [ -d "$ACME_TEST_PLAYWRIGHT_DIR/node_modules/playwright-core" ]; then
    return 0
  fi
  command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
  local dir=${XDG_CACHE_HOME:-$HOME/.cache}/acme-webhooks/playwright-core-$PLAYWRIGHT_VERSION
  if [ ! -f "$dir/node_modules/playwright-core/package.json" ]; then
    log "installing playwright-core $PLAYWRIGHT_VERSION from npm into $dir"
    mkdir -p "$dir"
    [ -f "$dir/package.json" ] || echo '{"private": true}' >"$dir/package.json"
    (cd "$dir" && npm install --no-audit --no-fund --ignore-scripts --silent "playwright-core@$PLAYWRIGHT_VERSION" >&2)
  fi
  export ACME_TEST_PLAYWRIGHT_DIR=$dir
}

pg_accepts() { # url
  command -v psql >/dev/null && PGCONNECT_TIMEOUT=3 psql "$1" -w -tAc 'select 1' >/dev/null 2>&1
}

# The directory of a PostgreSQL server's initdb, pg_ctl and postgres: the newest
# /usr/lib/postgresql/<version>/bin that has all three (postgresql-client alone makes that
# directory too, with psql only), else where initdb on PATH really lives (/usr/local/bin may hold
# symbolic links to them). Prints nothing when there is none.
pg_server_bindir() {
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -rV) \
    "$(dirname "$(readlink -f "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")")"; do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ]; then
      echo "$dir"
      return 0
    fi
  done
}

# Exports ACME_TEST_DATABASE_URL: the given one; else a local server that lets `postgres` in
# without a password; else a throwaway cluster started here (installing PostgreSQL if needed).
ensure_postgres() {
  if [ -n "${ACME_TEST_DATABASE_URL:-}" ]; then
    log "PostgreSQL: using ACME_TEST_DATABASE_URL"
    return 0
  fi
  local local_url=postgres://postgres@127.0.0.1:5432/postgres
  if pg_accepts "$local_url"; then
    export ACME_TEST_DATABASE_URL=$local_url
    log "PostgreSQL: using the server on 127.0.0.1:5432"
    return 0
  fi
  local bindir
  bindir=$(pg_server_bindir)
  if [ -z "$bindir" ]; then
    apt_install postgresql postgresql-client
    bindir=$(pg_server_bindir)
    [ -n "$bindir" ] || { log "PostgreSQL: no initdb and pg_ctl after installing postgresql"; return 1; }
  fi
  local dir port user
  dir=$(mktemp -d /tmp/acme-pg.XXXXXX)
  port=$(free_port)
  # initdb refuses to run as root: the cluster belongs to an unprivileged user.
  if [ "$(id -u)" = 0 ]; then
    user=postgres
    id -u "$user" >/dev/null 2>&1 || useradd --system --no-create-home "$user"
    chown "$user" "$dir"
  else
    user=$(id -un)
  fi
  local run=(env)
  [ "$(id -u)" = 0 ] && run=(runuser -u "$user" --)
  log "PostgreSQL: starting a throwaway cluster on port $port ($bindir)"
  "${run[@]}" "$bindir/initdb" -D "$dir/data" -A trust -U postgres >"$dir/initdb.log"
  # pg_stat_statements (when the server has it) lets the benchmarks count statements per event.
  local preload=""
  [ -e "$("$bindir/pg_config" --pkglibdir 2>/dev/null || echo "$bindir/../lib")/pg_stat_statements.so" ] &&
    preload="-c shared_preload_libraries=pg_stat_statements"
  "${run[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=on $preload" start >/dev/null
  CLEANUP+=("${run[*]} $bindir/pg_ctl -D $dir/data -m fast stop >/dev/null; rm -rf $dir")
  export ACME_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:$port/postgres
}

java_major() { # the major version of the java scripts/kafka runs (8 for 1.8), nothing if none
  local java=${JAVA_HOME:+$JAVA_HOME/bin/}java
  command -v "$java" >/dev/null || return 0
  "$java" -XshowSettings:properties -version 2>&1 |
    sed -n 's/^ *java\.specification\.version = \(1\.\)\{0,1\}\([0-9]*\).*/\2/p'
}

# Java (17 or newer) and Maven, which scripts/kafka assembles and runs Apache Kafka with.
# Debian's default-jre-headless is 17 on bookworm, 21 on trixie; an older default falls back to
# openjdk-17-jre-headless.
ensure_java() {
  local missing=() major
  major=$(java_major)
  [ "${major:-0}" -ge 17 ] 2>/dev/null || missing+=(default-jre-headless)
  command -v mvn >/dev/null || missing+=(maven)
  if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
  major=$(java_major)
  if ! [ "${major:-0}" -ge 17 ] 2>/dev/null; then
    apt_install openjdk-17-jre-headless
    major=$(java_major)
    [ "${major:-0}" -ge 17 ] 2>/dev/null || { log "Kafka needs Java 17 or newer; java is ${major:-missing}"; return 1; }
  fi
}

# Exports ACME_TEST_KAFKA_BROKERS: the given one, else a one-node Apache Kafka started here
# with scripts/kafka (jars from Maven Central, cached in ~/.cache/acme-webhooks), and
# ACME_TEST_KAFKA_SCRIPT, for the tests that run a cluster of their own. ACME_TEST_BROKER=tansu
# starts Tansu instead (built with `cargo install` the first time, about 13 minutes on 2 cores).
ensure_broker() {
  export ACME_TEST_KAFKA_SCRIPT=$PWD/scripts/kafka
  if [ -n "${ACME_TEST_KAFKA_BROKERS:-}" ]; then
    log "Kafka: using ACME_TEST_KAFKA_BROKERS=$ACME_TEST_KAFKA_BROKERS"
    return 0
  fi
  if [ "${ACME_TEST_BROKER:-kafka}" = tansu ]; then
    ensure_tansu
    return
  fi
  ensure_java
  local dir started
  dir=$(mktemp -d /tmp/acme-kafka.XXXXXX)
  started=$(date +%s.%N)
  log "Kafka: starting Apache Kafka (one node) in $dir"
  CLEANUP+=("scripts/kafka stop --dir $dir --purge >/dev/null 2>&1")
  local line
  line=$(scripts/kafka start --dir "$dir")
  export ACME_TEST_KAFKA_BROKERS=${line#KAFKA_BROKERS=}
  export ACME_TEST_KAFKA_DIR=$dir
  log "Kafka: $ACME_TEST_KAFKA_BROKERS ready in $(python3 -c "import time; print(round(time.time() - $started, 1))") s"
}

ensure_tansu() {
  local tansu
  tansu=$(command -v tansu || true)
  [ -z "$tansu" ] && [ -x "$HOME/.cargo/bin/tansu" ] && tansu=$HOME/.cargo/bin/tansu
  if [ -z "$tansu" ]; then
    log "installing the Tansu broker $TANSU_VERSION (about 13 minutes on 2 cores, once)"
    cargo install tansu --locked --version "$TANSU_VERSION" --features dynostore
    tansu=$HOME/.cargo/bin/tansu
  fi
  local port log_file
  port=$(free_port)
  log_file=$(mktemp /tmp/acme-tansu.XXXXXX.log)
  log "Kafka: starting Tansu on 127.0.0.1:$port (log: $log_file)"
  "$tansu" broker --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine memory://tansu/ >"$log_file" 2>&1 &
  local pid=$!
  CLEANUP+=("kill $pid 2>/dev/null; wait $pid 2>/dev/null")
  wait_for_port "$port" 30 || { log "Tansu did not start:"; tail -n 20 "$log_file" >&2; return 1; }
  export ACME_TEST_KAFKA_BROKERS=127.0.0.1:$port
}

# Prometheus and promtool for the alert-rule tests and the scrape test (Debian's `prometheus`
# package). Debian's package would start its own service: a policy-rc.d that denies service
# starts is put in place for the install when none exists. Exports ACME_TEST_PROMETHEUS and
# ACME_TEST_PROMTOOL; the tests start their own Prometheus on a free port with a temporary config.
ensure_prometheus() {
  if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
    local policy=/usr/sbin/policy-rc.d added=
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
      as_root chmod +x "$policy"
      added=1
    fi
    apt_install prometheus || { [ -n "$added" ] && as_root rm -f "$policy"; return 1; }
    [ -n "$added" ] && as_root rm -f "$policy"
  fi
  export ACME_TEST_PROMETHEUS=${ACME_TEST_PROMETHEUS:-$(command -v prometheus)}
  export ACME_TEST_PROMTOOL=${ACME_TEST_PROMTOOL:-$(command -v promtool)}
}
