# Shared by scripts/test and scripts/demo: make sure the tools and a broker are there.
# Sourced, not run.

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

ensure_cargo() {
  command -v cargo >/dev/null 2>&1 || die "cargo is not installed. Install Rust from https://rustup.rs (stable), then run this again."
}

# host and port of JOURNEYMAN_AMQP_URL (default: the local broker).
amqp_endpoint() {
  local url="${JOURNEYMAN_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
  local rest="${url#*://}"
  rest="${rest##*@}"
  rest="${rest%%/*}"
  local host="${rest%%:*}" port=5672
  case "$url" in amqps://*) port=5671 ;; esac
  [[ "$rest" == *:* ]] && port="${rest##*:}"
  echo "$host $port"
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_for_port() {
  local host=$1 port=$2 secs=$3 i
  for ((i = 0; i < secs; i++)); do
    port_open "$host" "$port" && return 0
    sleep 1
  done
  return 1
}

# Uses a broker already listening; else starts an installed rabbitmq-server; else installs
# it from the OS packages when root; else fails saying what to do.
ensure_broker() {
  read -r host port < <(amqp_endpoint)
  if port_open "$host" "$port"; then
    say "broker: RabbitMQ answers at $host:$port"
    return 0
  fi
  case "$host" in
    127.0.0.1 | localhost | ::1) ;;
    *) die "no broker answers at $host:$port (JOURNEYMAN_AMQP_URL). Start it, or unset JOURNEYMAN_AMQP_URL to use a local one." ;;
  esac
  if ! command -v rabbitmq-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      say "broker: installing rabbitmq-server from the OS packages"
      DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >&2 ||
        die "installing rabbitmq-server failed; install RabbitMQ 3.10+ yourself and run this again."
    else
      die "no broker at $host:$port and rabbitmq-server is not installed. Install RabbitMQ 3.10+ (e.g. 'sudo apt-get install rabbitmq-server') or point JOURNEYMAN_AMQP_URL at one."
    fi
  fi
  say "broker: starting rabbitmq-server -detached"
  rabbitmq-server -detached >&2 || true
  wait_for_port "$host" "$port" 120 ||
    die "rabbitmq-server did not start listening on $host:$port within 120s; see its logs (/var/log/rabbitmq)."
  # The port opens a moment before the node accepts logins.
  if command -v rabbitmqctl >/dev/null 2>&1; then
    timeout 120 rabbitmqctl await_startup >/dev/null 2>&1 || true
  fi
  say "broker: RabbitMQ started at $host:$port"
}
