#!/bin/sh
# Installs the library into a scratch DESTDIR and builds a program against that copy
# with pkg-config alone, then runs it: what a user of `make install` gets must work.
set -eu
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
prefix=/opt/pconn-test
make -s install PREFIX=$prefix DESTDIR="$tmp" >/dev/null
root="$tmp$prefix"
test -L "$root/lib/libpconn.so"
soname=$(readelf -d "$root/lib/libpconn.so" | sed -n 's/.*SONAME.*\[\(.*\)\]/\1/p')
test -f "$root/lib/$soname"
cat > "$tmp/prog.c" <<'C'
#include <pconn.h>
#include <stdio.h>
#include <string.h>
int main(void)
{
    const char *addr[] = {"127.0.0.1:1"};
    pconn_resolver_t *r = pconn_resolver_static(addr, 1);
    char out[PCONN_ADDRESS_MAX];
    pconn_error_t err;
    if (pconn_resolve(r, out, sizeof out, &err) != PCONN_OK || strcmp(out, addr[0]) != 0)
        return 1;
    pconn_resolver_free(r);
    printf("libpconn %s\n", pconn_version());
    return 0;
}
C
export PKG_CONFIG_PATH="$root/lib/pkgconfig"
# pkg-config prints the prefix the .pc names; point it into the scratch DESTDIR.
export PKG_CONFIG_SYSROOT_DIR="$tmp"
cc -o "$tmp/prog" "$tmp/prog.c" $(pkg-config --cflags --libs pconn)
LD_LIBRARY_PATH="$root/lib" "$tmp/prog" | grep -q "libpconn"
# The shared library exports the public API and nothing else.
bad=$(nm -D --defined-only "$root/lib/$soname" | awk '{print $3}' | grep -v '^pconn_' | grep -v '^PCONN' || true)
internal=$(nm -D --defined-only "$root/lib/$soname" | awk '{print $3}' | grep '^pconn__' || true)
if [ -n "$bad$internal" ]; then
    echo "install-test: unexpected exported symbols: $bad $internal"
    exit 1
fi
for h in "$root"/include/pconn*.h; do
    cc -std=c11 -Wall -Wextra -Werror -fsyntax-only -x c "$h"
done
echo "install-test: 1 passed, 0 failed"
