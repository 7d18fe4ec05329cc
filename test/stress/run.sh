#!/bin/sh
# Runs every stress program of one build directory with the sanitizers' options of
# run-tests.sh; STRESS_SEED in the environment replays a run.
#   test/stress/run.sh BUILD_DIR [SANITIZE] [ROUNDS]
set -u
build=$1
sanitize=${2:-}
export STRESS_ROUNDS=${3:-1000}
here=$(cd "$(dirname "$0")/.." && pwd)
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$here/tsan.supp"
export PCONN_TEST_BUILD="$build"
run=""
[ "$sanitize" = thread ] && run="setarch $(uname -m) -R"
status=0
for p in "$build"/stress/*; do
    echo "== $(basename "$p")"
    $run "$p" || status=1
done
exit $status
