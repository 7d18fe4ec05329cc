#!/bin/bash
# Runs samples/redis_counter against a throw-away redis-server on 127.0.0.1 (a free
# port, no persistence) and restarts that server twice while 8 threads INCR through the
# pool. Each step waits for the sample's answer (INCRs acknowledged after the restart),
# never for time. Exit 0 with the sample's report; 77 when redis-server or the sample is
# missing (said on stdout); 1 on failure.
#   test/redis_counter.sh BUILD_DIR
set -u
build=$1
sample=$build/samples/redis_counter
if ! command -v redis-server >/dev/null; then
    echo "SKIPPED: redis-server is not installed (test/deps.sh installs it)"
    exit 77
fi
if [ ! -x "$sample" ]; then
    echo "SKIPPED: $sample was not built (no hiredis headers: test/deps.sh installs libhiredis-dev)"
    exit 77
fi
dir=$(mktemp -d)
redis_pid=""
sample_pid=""
cleanup() {
    [ -n "$redis_pid" ] && { kill -9 "$redis_pid"; wait "$redis_pid"; } 2>/dev/null
    [ -n "$sample_pid" ] && { kill -9 "$sample_pid"; wait "$sample_pid"; } 2>/dev/null
    rm -rf "$dir"
}
trap cleanup EXIT
trap '' PIPE # a sample that died fails the next write to it, and the read says so

# Starts redis-server on $port in the foreground of a background job; 0 once it answers.
start_redis() {
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$dir" --daemonize no --logfile "$dir/redis.log" &
    redis_pid=$!
    # Polls (bounded: 200 tries) for the moment it listens; a server that exited at
    # once found the port taken.
    for _ in $(seq 200); do
        redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null | grep -q PONG && return 0
        kill -0 "$redis_pid" 2>/dev/null || return 1 # it exited: port taken
        sleep 0.02
    done
    return 1
}

started=0
for _ in $(seq 20); do
    port=$(shuf -i 20000-60000 -n 1)
    if start_redis; then started=1; break; fi
    { kill -9 "$redis_pid"; wait "$redis_pid"; } 2>/dev/null
done
[ "$started" = 1 ] || { echo "FAILED: could not start redis-server"; exit 1; }

mkfifo "$dir/in" "$dir/out"
timeout 120 "$sample" "127.0.0.1:$port" <"$dir/in" >"$dir/out" 2>"$dir/events" &
sample_pid=$!
exec 3>"$dir/in" 4<"$dir/out"

ask() { # sends a line, reads the answer
    echo "$1" >&3 2>/dev/null
    read -r answer <&4 || { echo "FAILED: the sample ended (events: $(tail -3 "$dir/events"))"; exit 1; }
    echo "  $1 -> $answer"
}

ask "wait 500"
for round in 1 2; do
    { kill -9 "$redis_pid"; wait "$redis_pid"; } 2>/dev/null
    echo "  redis-server killed (round $round), starting it again on $port"
    start_redis || { echo "FAILED: restarting redis-server"; exit 1; }
    ask "wait 500" # acknowledged by the new server: the pool reconnected
done
echo "stop" >&3
read -r report <&4
exec 3>&- 4<&-
wait "$sample_pid"
status=$?
sample_pid=""
echo "  $report"
echo "  reconnects: $(grep -c ': connected' "$dir/events") connected events for 4 slots"
[ "$status" -eq 0 ] || { echo "FAILED: redis_counter exited with $status"; exit 1; }
echo "OK"
