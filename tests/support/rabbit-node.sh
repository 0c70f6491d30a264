#!/usr/bin/env bash
# rabbit-node.sh - run PRIVATE RabbitMQ 3.10 nodes (Erlang 25, Debian packages) next to a shared
# broker without touching it.  Tested on Debian 12, rabbitmq-server 3.10.8, run as root.
#
#   rabbit-node.sh start   NAME AMQP_PORT DIST_PORT DIR   create DIR (first time) and start the node, wait until AMQP accepts
#   rabbit-node.sh start   DIR                             start again from DIR/node.env (same data dir => durable state back)
#   rabbit-node.sh stop    DIR                             graceful: rabbitmqctl shutdown (returns once the VM has exited)
#   rabbit-node.sh kill    DIR                             SIGKILL the beam.smp, wait until it is gone, drop stale pid file
#   rabbit-node.sh stop-app|start-app DIR                  stop/start only the rabbit app (VM and distribution stay up)
#   rabbit-node.sh close-conns DIR [REASON]                rabbitmqctl close_all_connections --global REASON
#   rabbit-node.sh cluster-join DIR SEED_DIR|SEED_NODE     stop_app, reset, join_cluster SEED, start_app
#   rabbit-node.sh force-boot DIR                          (node stopped) let it boot without waiting for dead peers
#   rabbit-node.sh ctl     DIR ARGS...                     rabbitmqctl      -n NODE ARGS (private cookie)
#   rabbit-node.sh queues  DIR ARGS...                     rabbitmq-queues  -n NODE ARGS
#   rabbit-node.sh diag    DIR ARGS...                     rabbitmq-diagnostics -n NODE ARGS
#   rabbit-node.sh pid     DIR                             pid of the node's beam.smp (empty + rc 1 if not running)
#   rabbit-node.sh running DIR                             rc 0 if the beam process is alive
#   rabbit-node.sh env     DIR                             print the exports used for this node (eval-able)
#   rabbit-node.sh destroy DIR                             kill if running, rm -rf DIR
#
# Environment knobs:
#   PRIVATE_RABBIT_COOKIE   Erlang cookie for private nodes (default below). All nodes of one private
#                           cluster MUST use the same value. It deliberately differs from the shared
#                           node's /var/lib/rabbitmq/.erlang.cookie, so a private CLI call can never
#                           authenticate against (i.e. never modify) the shared broker rabbit@localhost.
#   START_TIMEOUT           seconds to wait for start-up (default 60); on timeout the half-started
#                           node is killed unless KEEP_ON_FAIL=1
#   PRIVATE_RABBIT_EXTRA_CONF  extra rabbitmq.conf lines (used by the 4-argument form of start)
set -euo pipefail

RMQ_BIN=/usr/lib/rabbitmq/bin          # the real scripts; /usr/sbin/* are wrappers that `su rabbitmq`
COOKIE=${PRIVATE_RABBIT_COOKIE:-sigrun-private-rabbit-cookie}
START_TIMEOUT=${START_TIMEOUT:-60}

die() { echo "rabbit-node.sh: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN{printf "%.2f", b-a}'; }
absdir() { realpath -m "$1"; }

load() {          # load DIR/node.env and export the node's environment
    DIR=$(absdir "$1")
    [ -f "$DIR/node.env" ] || die "$DIR/node.env missing (run: rabbit-node.sh start NAME AMQP_PORT DIST_PORT $DIR)"
    # shellcheck disable=SC1091
    . "$DIR/node.env"
    export HOME="$DIR/home"                                   # => cookie file $DIR/home/.erlang.cookie
    export RABBITMQ_NODENAME="$NODE"
    export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    export RABBITMQ_NODE_PORT="$AMQP_PORT"
    export RABBITMQ_DIST_PORT="$DIST_PORT"
    export RABBITMQ_CONF_ENV_FILE="$DIR/rabbitmq-env.conf"     # do NOT source /etc/rabbitmq/rabbitmq-env.conf
    export RABBITMQ_CONFIG_FILE="$DIR/rabbitmq.conf"
    export RABBITMQ_CONFIG_FILES="$DIR/conf.d"                # default /etc/rabbitmq/conf.d/*.conf would leak in
    export RABBITMQ_ADVANCED_CONFIG_FILE="$DIR/advanced.config"  # default /etc/rabbitmq/advanced.config would leak in
    export RABBITMQ_MNESIA_BASE="$DIR/mnesia"
    export RABBITMQ_LOG_BASE="$DIR/log"
    export RABBITMQ_PID_FILE="$DIR/node.pid"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$DIR/enabled_plugins"   # empty => no plugin, no extra port
    export ERL_EPMD_ADDRESS=127.0.0.1                         # share the system epmd on 127.0.0.1:4369
    export ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}"   # dist port on loopback only
    unset RABBITMQ_ERLANG_COOKIE RABBITMQ_ENABLED_PLUGINS
}

ctl()    { "$RMQ_BIN/rabbitmqctl" -n "$NODE" "$@"; }

beam_pid() {      # prints pid of the live beam.smp of $NODE, rc 1 if none
    local p=""
    if [ -s "$RABBITMQ_PID_FILE" ]; then
        p=$(cat "$RABBITMQ_PID_FILE")
        if [ -n "$p" ] && [ -r "/proc/$p/environ" ] && tr '\0' '\n' < "/proc/$p/environ" | grep -qx "RABBITMQ_NODENAME=$NODE"; then
            echo "$p"; return 0
        fi
    fi
    # fallback (pid file missing/stale): scan beam.smp processes for RABBITMQ_NODENAME=$NODE
    for p in $(pgrep -x beam.smp || true); do
        if tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -qx "RABBITMQ_NODENAME=$NODE"; then
            echo "$p"; return 0
        fi
    done
    return 1
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

cmd_start() {
    if [ $# -eq 4 ]; then
        local name=$1 amqp=$2 dist=$3 dir; dir=$(absdir "$4")
        case "$name" in *@*) ;; *) name="$name@localhost" ;; esac
        [ "${name#*@}" = localhost ] || echo "rabbit-node.sh: warning: host part '${name#*@}' (use @localhost for short names)" >&2
        [ "$name" != rabbit@localhost ] || die "refusing to use the shared node's name rabbit@localhost"
        mkdir -p "$dir"/{home,mnesia,log,conf.d}
        if [ -f "$dir/node.env" ]; then
            # shellcheck disable=SC1091
            ( . "$dir/node.env"; [ "$NODE $AMQP_PORT $DIST_PORT" = "$name $amqp $dist" ] ) \
              || die "$dir already holds another node ($(cat "$dir/node.env" | tr '\n' ' '))"
        fi
        printf 'NODE=%q\nAMQP_PORT=%q\nDIST_PORT=%q\n' "$name" "$amqp" "$dist" > "$dir/node.env"
        printf '%s' "$COOKIE" > "$dir/home/.erlang.cookie"; chmod 400 "$dir/home/.erlang.cookie"
        : > "$dir/enabled_plugins"                      # empty plugin list (file must exist)
        printf '[].\n' > "$dir/advanced.config"
        printf '# private conf-env file: replaces /etc/rabbitmq/rabbitmq-env.conf\nERL_EPMD_ADDRESS=127.0.0.1\n' > "$dir/rabbitmq-env.conf"
        cat > "$dir/rabbitmq.conf" <<EOF
listeners.tcp.1 = 127.0.0.1:$amqp
loopback_users.guest = true
log.console = false
log.file.level = info
${PRIVATE_RABBIT_EXTRA_CONF:-}
EOF
        load "$dir"
    elif [ $# -eq 1 ]; then
        load "$1"
    else
        die "usage: start NAME AMQP_PORT DIST_PORT DIR | start DIR"
    fi
    if p=$(beam_pid); then die "$NODE already running (pid $p)"; fi
    port_busy "$AMQP_PORT" && die "port $AMQP_PORT already in use"
    port_busy "$DIST_PORT" && die "port $DIST_PORT already in use"
    rm -f "$RABBITMQ_PID_FILE"                          # stale after a kill -9; `wait` would read it
    local t0; t0=$(now)
    (cd "$DIR" && "$RMQ_BIN/rabbitmq-server" -detached)   # returns at once; VM forks away (ppid 1)
    # NB: `rabbitmqctl await_startup` fails at once (rc 69) if the node is not yet registered in
    # epmd, so use `wait PIDFILE`: waits for the pid file, then distribution, then the rabbit app.
    # NB2: `wait --timeout N` does NOT bound the whole wait (a node waiting for its cluster peers'
    # Mnesia tables kept it blocked ~10 min), hence the outer coreutils `timeout`.
    if ! timeout "$START_TIMEOUT" "$RMQ_BIN/rabbitmqctl" -n "$NODE" -q wait "$RABBITMQ_PID_FILE" --timeout "$START_TIMEOUT" >/dev/null; then
        echo "rabbit-node.sh: $NODE did not start (boot failed, or not ready within ${START_TIMEOUT}s); last log lines:" >&2
        grep -vE '^\S+ \S+ \[debug\]' "$RABBITMQ_LOG_BASE/$NODE.log" 2>/dev/null | tail -n 25 >&2 || true
        if [ "${KEEP_ON_FAIL:-0}" != 1 ] && p=$(beam_pid); then
            kill -9 "$p"; while kill -0 "$p" 2>/dev/null; do sleep 0.05; done; rm -f "$RABBITMQ_PID_FILE"
            echo "rabbit-node.sh: killed the half-started node (pid $p); set KEEP_ON_FAIL=1 to keep it" >&2
        fi
        exit 1
    fi
    local i=0; until port_busy "$AMQP_PORT"; do i=$((i+1)); [ $i -lt 100 ] || die "AMQP port $AMQP_PORT not open"; sleep 0.1; done
    echo "started $NODE pid=$(beam_pid) amqp=127.0.0.1:$AMQP_PORT dist=$DIST_PORT in $(since "$t0")s"
}

cmd_stop() {
    load "$1"
    local t0; t0=$(now)
    if ! beam_pid >/dev/null; then echo "$NODE not running"; rm -f "$RABBITMQ_PID_FILE"; return 0; fi
    # `shutdown` waits until the OS process has exited; `stop` returns while the VM is still exiting
    ctl -q shutdown >/dev/null
    echo "stopped $NODE in $(since "$t0")s"
}

cmd_kill() {
    load "$1"
    local p t0; t0=$(now)
    p=$(beam_pid) || { echo "$NODE not running"; rm -f "$RABBITMQ_PID_FILE"; return 0; }
    kill -9 "$p"
    while kill -0 "$p" 2>/dev/null; do sleep 0.05; done
    rm -f "$RABBITMQ_PID_FILE"
    echo "killed $NODE (pid $p) in $(since "$t0")s"
}

cmd_cluster_join() {
    load "$1"
    local seed=$2
    if [ -f "$seed/node.env" ]; then seed=$(. "$(absdir "$seed")/node.env"; echo "$NODE"); fi
    local t0; t0=$(now)
    ctl -q stop_app
    ctl -q reset
    ctl -q join_cluster "$seed"
    ctl -q start_app
    ctl -q await_startup
    echo "$NODE joined $seed in $(since "$t0")s"
}

cmd_destroy() {
    local dir; dir=$(absdir "$1")
    [ -d "$dir" ] || { echo "$dir: nothing to destroy"; return 0; }
    if [ -f "$dir/node.env" ]; then
        load "$dir"
        if p=$(beam_pid); then kill -9 "$p"; while kill -0 "$p" 2>/dev/null; do sleep 0.05; done; fi
    fi
    rm -rf "$dir"
    echo "destroyed $dir"
}

sub=${1:-}; [ -n "$sub" ] || { sed -n '2,/^set -euo/p' "$0"; exit 2; }; shift
case "$sub" in
    start)        cmd_start "$@" ;;
    stop)         cmd_stop "$1" ;;
    kill)         cmd_kill "$1" ;;
    restart)      cmd_stop "$1"; cmd_start "$1" ;;
    stop-app)     load "$1"; t0=$(now); ctl -q stop_app;  echo "stop_app $NODE in $(since "$t0")s" ;;
    start-app)    load "$1"; t0=$(now); ctl -q start_app; ctl -q await_startup; echo "start_app $NODE in $(since "$t0")s" ;;
    force-boot)   load "$1"; ctl force_boot ;;   # node must be stopped; next start skips waiting for peers
    close-conns)  load "$1"; ctl close_all_connections --global "${2:-closed by node.sh}" ;;
    cluster-join) cmd_cluster_join "$1" "$2" ;;
    ctl)          load "$1"; shift; ctl "$@" ;;
    queues)       load "$1"; shift; "$RMQ_BIN/rabbitmq-queues" -n "$NODE" "$@" ;;
    diag)         load "$1"; shift; "$RMQ_BIN/rabbitmq-diagnostics" -n "$NODE" "$@" ;;
    pid)          load "$1"; beam_pid ;;
    running)      load "$1"; beam_pid >/dev/null ;;
    env)          load "$1"; env | grep -E '^(HOME|RABBITMQ_|ERL_)' | sed 's/^/export /; s/=\(.*\)$/="\1"/' ;;
    destroy)      cmd_destroy "$1" ;;
    *)            die "unknown subcommand $sub" ;;
esac
