# charts.gp - the pictures of docs/BENCHMARKS.md, from the data `make bench` writes.
#   gnuplot -e "data='DIR'; out='DIR'" test/bench/charts.gp
set terminal svg size 720,400 dynamic font "sans,12"
set grid

set output out."/retry_spread.svg"
set title "Retries of 1,000 pconns refused at once (delay 1 s, jitter ±30 %)"
set xlabel "time since start (ms), 100 ms buckets"
set ylabel "retries in the bucket"
set style fill solid 0.6
set boxwidth 90
plot data."/retry_spread.dat" using 1:2 with boxes lc rgb "#4477aa" title "retries"

set output out."/reconnect_latency.svg"
set title "Server close to next CONNECTED (one core)"
set xlabel "percentile"
set ylabel "microseconds"
set key left top
plot data."/reconnect_latency.dat" using 1:2 with lines lw 2 lc rgb "#4477aa" title "libpconn", \
     data."/reconnect_latency.dat" using 1:3 with lines lw 2 lc rgb "#cc6677" title "hand-written blocking loop"

set output out."/rpc_roundtrip.svg"
set title "RPC round trip, 64 bytes, loopback"
set logscale y
plot data."/rpc_roundtrip.dat" using 1:2 with lines lw 2 lc rgb "#4477aa" title "pconn_rpc_call", \
     data."/rpc_roundtrip.dat" using 1:3 with lines lw 2 lc rgb "#cc6677" title "raw socket ping-pong"
