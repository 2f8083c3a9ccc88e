#!/usr/bin/env bash
# taskgate local quick start: the worker on SQLite behind the gateway, with a dev PKI.
#
#   deploy/local/run.sh            build, start both, enqueue a sample task, print a curl
#                                  line that returns metrics, wait (Ctrl-C stops both)
#   deploy/local/run.sh --check    the same, then run the printed curl line, assert it
#                                  returns taskgate_ metrics, stop both; exit 0 or 1 (CI)
#
# Everything it makes lives in the state folder (default ./.state, git-ignored): the dev
# CA, server and client certificates, the token file, the SQLite database, the worker's
# socket and both logs. A second run reuses the PKI, the token and the database.
#
# Environment:
#   TASKGATE_STATE_DIR   state folder (default: .state in the repository)
#   TASKGATE_PORT        gateway port on 127.0.0.1 (default 9443)
#   TASKGATE_BIN_DIR     use the `worker` and `gateway` binaries in this folder and skip
#                        the build (the deploy tests pass their own target dir)
#   TASKGATE_CHECK=1     same as --check
#   CARGO_TARGET_DIR     honoured by the build (binaries in $CARGO_TARGET_DIR/release)
#
# Dev only: the CA key sits next to the certificates it signs and nothing is rotated.
# Production set-ups are in deploy/k8s, deploy/systemd and deploy/ingress.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

CHECK="${TASKGATE_CHECK:-0}"
for arg in "$@"; do
  case "$arg" in
    --check) CHECK=1 ;;
    -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown argument $arg (try --help)" >&2; exit 64 ;;
  esac
done

STATE="${TASKGATE_STATE_DIR:-$ROOT/.state}"
PORT="${TASKGATE_PORT:-9443}"
if [ -t 1 ]; then say() { printf '\033[1m==>\033[0m %s\n' "$*"; }; else say() { printf '==> %s\n' "$*"; }; fi
die() { printf 'run.sh: %s\n' "$*" >&2; exit 1; }

for tool in openssl curl python3; do
  command -v "$tool" >/dev/null || die "$tool is missing; run deploy/local/install-deps.sh"
done

# --- binaries -------------------------------------------------------------------------
if [ -n "${TASKGATE_BIN_DIR:-}" ]; then
  BIN="$TASKGATE_BIN_DIR"
else
  command -v cargo >/dev/null || die "cargo is missing (install Rust with rustup)"
  say "building worker and gateway (release; the first build takes several minutes)"
  cargo build --release --locked -p taskgate-worker -p taskgate-gateway
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
fi
WORKER="$BIN/worker"
GATEWAY="$BIN/gateway"
[ -x "$WORKER" ] || die "no worker binary at $WORKER"
[ -x "$GATEWAY" ] || die "no gateway binary at $GATEWAY"

# --- state folder and dev PKI -----------------------------------------------------------
mkdir -p "$STATE"
chmod 0700 "$STATE"
STATE="$(cd "$STATE" && pwd)"
umask 077   # everything below is private to the user running this

# Unix socket paths are limited to 107 bytes; a deep checkout would exceed that.
SOCK="$STATE/worker.sock"
if [ "${#SOCK}" -gt 100 ]; then
  SOCK_DIR="$(mktemp -d "${TMPDIR:-/tmp}/taskgate.XXXXXX")"
  SOCK="$SOCK_DIR/worker.sock"
fi

ext_file() { # name, then the extension lines
  local f="$STATE/$1.ext"; shift
  printf '%s\n' "$@" >"$f"
  printf '%s' "$f"
}

if [ ! -s "$STATE/ca.pem" ] || [ ! -s "$STATE/ca.key" ]; then
  say "creating a dev CA in $STATE"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$STATE/ca.key" 2>/dev/null
  openssl req -x509 -new -key "$STATE/ca.key" -sha256 -days 3650 \
    -subj "/CN=taskgate dev CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" \
    -out "$STATE/ca.pem"
  rm -f "$STATE/server.pem" "$STATE/client.pem"   # signed by a CA that is gone
fi

issue() { # name, subject CN, extendedKeyUsage, subjectAltName
  local name="$1" cn="$2" eku="$3" san="$4"
  if [ -s "$STATE/$name.pem" ] && [ -s "$STATE/$name.key" ] &&
     openssl verify -CAfile "$STATE/ca.pem" "$STATE/$name.pem" >/dev/null 2>&1 &&
     openssl x509 -in "$STATE/$name.pem" -noout -checkend 86400 >/dev/null; then
    return 0   # present, signed by our CA, valid for at least another day
  fi
  say "issuing the $name certificate ($san)"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$STATE/$name.key" 2>/dev/null
  openssl req -new -key "$STATE/$name.key" -subj "/CN=$cn" -out "$STATE/$name.csr"
  local ext
  ext="$(ext_file "$name" \
    "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=$eku" \
    "subjectAltName=$san" \
    "authorityKeyIdentifier=keyid")"
  openssl x509 -req -in "$STATE/$name.csr" -CA "$STATE/ca.pem" -CAkey "$STATE/ca.key" \
    -CAcreateserial -CAserial "$STATE/ca.srl" -sha256 -days 825 -extfile "$ext" \
    -out "$STATE/$name.pem" 2>/dev/null
  rm -f "$STATE/$name.csr" "$ext"
}
issue server "localhost" serverAuth "DNS:localhost,IP:127.0.0.1,IP:::1"
issue client "taskgate-dev-client" clientAuth "DNS:taskgate-dev-client"

if [ ! -s "$STATE/token" ]; then
  say "creating a random token in $STATE/token"
  openssl rand -hex 32 >"$STATE/token"
fi
chmod 0600 "$STATE"/*.key "$STATE/token"

# --- database ---------------------------------------------------------------------------
export DATABASE_URL="sqlite://$STATE/taskgate.db?mode=rwc"
export ALLOWED_TASK_MODULES="examples.*"
# Executors start with an empty environment plus an allow-list: PYTHONPATH must be
# listed (--env-allow) for `python3 -m examples.hello` to find the repository's module.
export PYTHONPATH="$ROOT"
export TASKGATE_LOG_FORMAT="${TASKGATE_LOG_FORMAT:-json}"
"$WORKER" migrate >/dev/null 2>>"$STATE/worker.log" ||
  { tail -n 5 "$STATE/worker.log" >&2; die "worker migrate failed"; }

# --- processes --------------------------------------------------------------------------
WORKER_PID=""
GATEWAY_PID=""
stop() {
  trap - INT TERM EXIT
  local pid
  for pid in $GATEWAY_PID $WORKER_PID; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in $GATEWAY_PID $WORKER_PID; do
    wait "$pid" 2>/dev/null || true
  done
  [ -n "${SOCK_DIR:-}" ] && rm -rf "$SOCK_DIR"
  [ -n "$WORKER_PID$GATEWAY_PID" ] && say "stopped worker and gateway"
  WORKER_PID=""; GATEWAY_PID=""
}
on_signal() { echo; stop; exit 130; }
trap on_signal INT TERM
trap stop EXIT

show_logs() {
  echo "--- worker log (tail) ---" >&2; tail -n 20 "$STATE/worker.log" >&2 || true
  echo "--- gateway log (tail) ---" >&2; tail -n 20 "$STATE/gateway.log" >&2 || true
}
fail() { printf 'run.sh: %s\n' "$*" >&2; show_logs; exit 1; }

if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
  die "127.0.0.1:$PORT is already in use (another run.sh?); stop it or set TASKGATE_PORT"
fi

RUN_AS_ROOT=()
if [ "$(id -u)" -eq 0 ]; then
  # The state folder is private to root, so the worker cannot drop to another user and
  # still open its database; tasks would run as root. Fine for a local demo only.
  echo "run.sh: running as root: tasks run as root too (--allow-root); run as a normal user to avoid that" >&2
  RUN_AS_ROOT=(--allow-root)
fi

say "starting the worker (socket $SOCK, log $STATE/worker.log)"
"$WORKER" run --metrics-listen "unix:$SOCK" --socket-mode 0600 \
  --env-allow PYTHONPATH --module-runner "python3 -m {module}" \
  --payload-mode stdin "${RUN_AS_ROOT[@]}" \
  >>"$STATE/worker.log" 2>&1 &
WORKER_PID=$!

healthy=0
for _ in $(seq 1 100); do
  kill -0 "$WORKER_PID" 2>/dev/null || fail "the worker exited during start-up"
  if "$WORKER" healthcheck --metrics-listen "unix:$SOCK" >/dev/null 2>&1; then healthy=1; break; fi
  sleep 0.1
done
[ "$healthy" = 1 ] || fail "the worker did not become healthy within 10 s"

say "starting the gateway on https://127.0.0.1:$PORT (log $STATE/gateway.log)"
"$GATEWAY" --listen "127.0.0.1:$PORT" --upstream "unix:$SOCK" \
  --tls-cert "$STATE/server.pem" --tls-key "$STATE/server.key" \
  --tls-client-ca "$STATE/ca.pem" \
  --auth-token-file "$STATE/token" \
  --allow-cidr 127.0.0.0/8 --allow-cidr ::1/128 \
  --log-format json \
  >>"$STATE/gateway.log" 2>&1 &
GATEWAY_PID=$!

# Ready = an authorized /healthz through the gateway answers 200. (A bare TCP connect
# would do, but the gateway audits it as a failed TLS handshake.) The token goes in a
# header file, not in curl's argv, where other local users could read it.
printf 'Authorization: Bearer %s\n' "$(cat "$STATE/token")" >"$STATE/auth.header"
up=0
for _ in $(seq 1 100); do
  kill -0 "$GATEWAY_PID" 2>/dev/null || fail "the gateway exited during start-up"
  code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 --cacert "$STATE/ca.pem" \
    --cert "$STATE/client.pem" --key "$STATE/client.key" -H "@$STATE/auth.header" \
    "https://127.0.0.1:$PORT/healthz" 2>/dev/null || true)"
  if [ "$code" = 200 ]; then up=1; break; fi
  sleep 0.1
done
[ "$up" = 1 ] || fail "the gateway did not answer /healthz on 127.0.0.1:$PORT within 10 s (last status: ${code:-none})"

say "enqueueing a sample task (module examples.hello)"
TASK_ID="$(printf '{"name": "taskgate"}' |
  "$WORKER" enqueue --module examples.hello --payload-stdin 2>>"$STATE/worker.log")" ||
  fail "worker enqueue failed"
echo "task $TASK_ID; see it with: DATABASE_URL='$DATABASE_URL' $WORKER status $TASK_ID"

CURL="curl -sS --fail --cacert $STATE/ca.pem --cert $STATE/client.pem --key $STATE/client.key -H \"Authorization: Bearer \$(cat $STATE/token)\" https://127.0.0.1:$PORT/metrics"

if [ "$CHECK" = 1 ]; then
  say "check: the printed curl line returns taskgate_ metrics"
  echo "$CURL"
  ok=0
  for _ in $(seq 1 50); do
    if out="$(bash -c "$CURL" 2>"$STATE/curl.err")" && grep -q '^taskgate_' <<<"$out"; then ok=1; break; fi
    sleep 0.2
  done
  [ "$ok" = 1 ] || fail "curl did not return taskgate_ metrics: $(cat "$STATE/curl.err")"
  echo "$(grep -c '^taskgate_' <<<"$out") taskgate_ sample lines"

  say "check: no token is refused (401), no client certificate fails the handshake"
  code="$(curl -s -o /dev/null -w '%{http_code}' --cacert "$STATE/ca.pem" \
    --cert "$STATE/client.pem" --key "$STATE/client.key" "https://127.0.0.1:$PORT/metrics" || true)"
  [ "$code" = 401 ] || fail "a request without a token got $code, not 401"
  if curl -s -o /dev/null --cacert "$STATE/ca.pem" -H "@$STATE/auth.header" \
       "https://127.0.0.1:$PORT/metrics"; then
    fail "a client without a certificate got an answer"
  fi

  say "check: the sample task $TASK_ID succeeds"
  state=""
  for _ in $(seq 1 100); do
    status="$("$WORKER" status "$TASK_ID")"
    state="$(python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])' <<<"$status")"
    [ "$state" = succeeded ] && break
    case "$state" in dead|cancelled) break ;; esac
    sleep 0.1
  done
  [ "$state" = succeeded ] || fail "task $TASK_ID is $state, not succeeded: $status"
  say "check passed"
  exit 0
fi

# Builtins only from here on: a Ctrl-C that lands while an external command runs in the
# foreground and exits normally would not reach the trap (bash leaves SIGINT to it).
printf '\ntaskgate is running: worker (pid %s) behind the gateway (pid %s).\n' "$WORKER_PID" "$GATEWAY_PID"
printf 'Metrics through the gateway, with the dev client certificate and the token:\n\n'
printf '  %s\n\n' "$CURL"
printf 'Also /healthz and /events (curl -N). Press Ctrl-C to stop both.\n'
wait -n "$WORKER_PID" "$GATEWAY_PID" || true
fail "a process exited on its own"
