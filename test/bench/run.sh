#!/bin/sh
# Runs every benchmark of a build directory; prints the table and writes
# test/bench/results.json (a list of {name, value, unit, baseline, ratio, goal, met}).
#   test/bench/run.sh BUILD_DIR
set -eu
build=$1
here=$(cd "$(dirname "$0")" && pwd)
lines=$(mktemp)
trap 'rm -f "$lines"' EXIT
data="$build/bench/data"
mkdir -p "$data"
export PCONN_BENCH_OUT="$lines" PCONN_TEST_BUILD="$build" PCONN_BENCH_DATA="$data"
echo "machine: $(nproc) cores, $(sed -n 's/^model name\t: //p' /proc/cpuinfo | head -1)"
for b in "$build"/bench/bench_*; do
    echo "== $(basename "$b")"
    "$b"
done
{ echo "["; sed '$!s/$/,/' "$lines" | sed 's/^/  /'; echo "]"; } > "$here/results.json"
echo "wrote $here/results.json"
# The charts of docs/BENCHMARKS.md (gnuplot: test/deps.sh installs it).
if command -v gnuplot >/dev/null 2>&1; then
    charts="$here/../../docs/bench"
    mkdir -p "$charts"
    gnuplot -e "data='$data'; out='$charts'" "$here/charts.gp" && echo "wrote $charts/*.svg"
fi
