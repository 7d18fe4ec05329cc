#!/bin/sh
# The ABI of this tree's libpconn.so against the one of a release tag, with libabigail's
# abidiff (functions and types reachable from the public headers only).
#   test/abi-check.sh BUILD_DIR TAG
# Passes when there is no tag yet or no abidiff (saying so), and when the only changes
# are added functions. Any other change fails unless the soname changed with it: abidiff
# calls a changed struct member only an "ABI change" (4), not "incompatible" (8), and a
# program built against the old header would still break.
set -eu
build=$1
tag=$2
if [ -z "$tag" ]; then
    echo "abi-check: no release tag (v*) yet: nothing to compare against"
    exit 0
fi
if ! command -v abidiff >/dev/null; then
    echo "abi-check: abidiff not installed (apt-get install abigail-tools): skipped"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
git archive "$tag" | tar -x -C "$tmp"
make -s -C "$tmp" lib OPT="-O2 -g" >/dev/null
old=$(ls "$tmp"/build/plain/libpconn.so.* | head -n 1)
new=$(ls "$build"/libpconn.so.* | head -n 1)
status=0
abidiff --no-added-syms --headers-dir1 "$tmp/include" --headers-dir2 include "$old" "$new" ||
    status=$?
# abidiff's status is a bit mask: 1 error, 2 usage, 4 ABI change, 8 incompatible change.
if [ $((status & 3)) -ne 0 ]; then
    echo "abi-check: abidiff failed (status $status)"
    exit 1
fi
if [ $((status & 12)) -ne 0 ]; then
    if [ "$(basename "$old")" = "$(basename "$new")" ]; then
        echo "abi-check: the ABI changed against $tag with the same soname $(basename "$new")"
        exit 1
    fi
    echo "abi-check: changed against $tag, as the new soname $(basename "$new") says"
    exit 0
fi
echo "abi-check: compatible with $tag ($(basename "$old"))"
