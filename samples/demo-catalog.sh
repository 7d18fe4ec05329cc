#!/bin/sh
# The catalog demo: a local etcd, two echo servers that announce themselves in it
# (`pconn serve --announce`), a client that follows the catalog (`pconn watch
# etcd:URL/PREFIX`). The server the client is connected to is killed with SIGKILL; its lease
# expires and the client moves to the other one.
#   samples/demo-catalog.sh BUILD_DIR
set -eu
bin=$1/samples/pconn
tmp=$(mktemp -d)
pids=""
cleanup() {
    for p in $pids; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$tmp"
}
trap cleanup EXIT INT TERM
now_ms() { echo $(($(date +%s%N) / 1000000)); }
# Waits (up to 30 s) until file $1 has a line matching $2; prints that line.
wait_line() {
    timeout 30 sh -c 'tail -n +1 -f "$1" | grep -m1 -e "$2"' _ "$1" "$2"
}

cport=$("$bin" port)
pport=$("$bin" port)
url=http://127.0.0.1:$cport
for v in $(env | sed -n 's/^\(ETCD_[A-Z_]*\)=.*/\1/p'); do unset "$v"; done
etcd --name "pconn-demo-$$" --data-dir "$tmp/etcd" \
    --listen-client-urls "$url" --advertise-client-urls "$url" \
    --listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
    --initial-cluster "pconn-demo-$$=http://127.0.0.1:$pport" \
    --heartbeat-interval 10 --election-timeout 100 >"$tmp/etcd.log" 2>&1 &
pids="$pids $!"
wait_line "$tmp/etcd.log" "ready to serve client requests" >/dev/null
echo "catalog demo: etcd at $url"

for name in A B; do
    "$bin" serve 127.0.0.1:0 --name "$name" --announce "$url" "/demo/echo/$name" --ttl 2 >"$tmp/$name.out" 2>&1 &
    eval "pid_$name=$!"
    pids="$pids $!"
    addr=$(wait_line "$tmp/$name.out" "listening on" | sed 's/listening on //')
    eval "addr_$name=$addr"
    echo "catalog demo: server $name at $addr, announced as /demo/echo/$name (lease TTL 2 s)"
done

# --pick first: the client sticks to the first key, A, for as long as A is listed.
"$bin" watch "etcd:$url/demo/echo/" --every 200 --pick first >"$tmp/watch.out" 2>&1 &
pids="$pids $!"
first=$(wait_line "$tmp/watch.out" "connected to" | sed 's/.*connected to //')
if [ "$first" = "$addr_A" ]; then victim=A; other=$addr_B; else victim=B; other=$addr_A; fi
eval "victim_pid=\$pid_$victim"
sleep 1
echo "catalog demo: kill -9 server $victim (the client's server): no clean stop, its lease must expire"
t0=$(now_ms)
kill -9 "$victim_pid"
wait_line "$tmp/watch.out" "connected to $other" >/dev/null
t1=$(now_ms)
sleep 0.2
sed 's/^/    /' "$tmp/watch.out"
echo "catalog demo: the client followed the catalog to $other $((t1 - t0)) ms after server $victim was killed"
