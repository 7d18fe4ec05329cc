#!/bin/sh
# Runs every test suite of one build directory, each in its own process with a time
# limit, and prints one closing line "N passed, N failed".
#   test/run-tests.sh BUILD_DIR [SANITIZE]
set -u
build=$1
sanitize=${2:-}
here=$(cd "$(dirname "$0")" && pwd)
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 suppressions=$here/tsan.supp"
run=""
# TSan needs a fixed memory layout on kernels with high mmap randomization.
[ "$sanitize" = thread ] && run="setarch $(uname -m) -R"
passed=0
failed=0
tests_passed=0
tests_failed=0
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for t in "$build"/test/test_*; do
    case $t in *.o) continue ;; esac
    name=$(basename "$t")
    echo "== $name"
    if PCONN_TEST_BUILD="$build" timeout 300 $run "$t" >"$out" 2>&1; then
        passed=$((passed + 1))
    else
        echo "== $name FAILED"
        failed=$((failed + 1))
    fi
    cat "$out"
    # CUnit's summary row: "tests  Total Ran Passed Failed Inactive".
    set -- $(awk '$1 == "tests" {print $4, $5}' "$out") 0 0
    tests_passed=$((tests_passed + $1))
    tests_failed=$((tests_failed + $2))
done
echo "suites: $passed passed, $failed failed"
echo "tests: $tests_passed passed, $tests_failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
