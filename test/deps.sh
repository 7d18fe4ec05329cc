#!/bin/sh
# Installs the system packages the build and the tests need, only when one is missing.
# Debian/Ubuntu (apt-get), as root or through sudo.
set -e
missing=""
have_header() { printf '#include <%s>\n' "$1" | ${CC:-cc} -E -x c - >/dev/null 2>&1; }
have_header curl/curl.h     || missing="$missing libcurl4-openssl-dev"
have_header openssl/ssl.h   || missing="$missing libssl-dev"
have_header jansson.h       || missing="$missing libjansson-dev"
have_header CUnit/CUnit.h   || missing="$missing libcunit1-dev"
have_header zmq.h           || missing="$missing libzmq3-dev"    # the benchmarks' baselines
have_header nng/nng.h       || missing="$missing libnng-dev"
command -v etcd >/dev/null  || missing="$missing etcd-server"
have_header hiredis/hiredis.h || missing="$missing libhiredis-dev"  # samples/redis_counter
command -v redis-server >/dev/null || missing="$missing redis-server" # its test
command -v pkg-config >/dev/null || missing="$missing pkg-config"
command -v clang >/dev/null || missing="$missing clang"
# -fsanitize=fuzzer links clang's runtime, which clang only recommends.
[ -n "$(ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a 2>/dev/null)" ] ||
    missing="$missing libclang-rt-14-dev libfuzzer-14-dev"
command -v cppcheck >/dev/null || missing="$missing cppcheck"  # make lint
command -v openssl >/dev/null || missing="$missing openssl"    # the TLS catalog test
command -v cmake >/dev/null || missing="$missing cmake"        # the install test (find_package)
command -v groff >/dev/null || missing="$missing groff-base"   # the install test (man pages)
command -v man >/dev/null || missing="$missing man-db"          # the install test (man -l)
command -v abidiff >/dev/null || missing="$missing abigail-tools" # make abi-check
# `make bench` only (test/deps.sh bench): the charts of docs/BENCHMARKS.md.
[ "${1:-}" = bench ] && ! command -v gnuplot >/dev/null && missing="$missing gnuplot-nox"
# `pkg-config --static --libs pconn` names libcurl's own private libraries; linking with
# them needs their -dev packages (the install test links libpconn.a that way). Asked
# after libcurl and pkg-config are there: on a fresh machine, after the first install.
static_missing() {
    if command -v pkg-config >/dev/null && pkg-config --exists libcurl &&
        ! echo 'int main(void) { return 0; }' |
            ${CC:-cc} -x c - -o /dev/null $(pkg-config --static --libs libcurl) 2>/dev/null; then
        echo "libnghttp2-dev librtmp-dev libssh2-1-dev libpsl-dev libldap-dev libzstd-dev" \
             "libkrb5-dev libbrotli-dev libidn2-dev zlib1g-dev libssl-dev"
    fi
}
install() {
    echo "deps: installing $*"
    if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
# Word splitting of the package lists below is meant.
missing=$(echo $missing $(static_missing))
[ -z "$missing" ] || install $missing
more=$(static_missing)
[ -z "$more" ] || install $more
exit 0
