#!/bin/sh
# Installs the library into a scratch DESTDIR and builds a program against that copy the
# three ways a user would: pkg-config with the shared library, pkg-config --static with
# libpconn.a, and CMake's find_package(pconn); runs each. Checks the exported symbols
# and their version, the headers on their own, the man pages (groff warnings are
# failures, every public function has a page), and that uninstall removes it all.
set -eu
# Run on its own by make check: a make of its own, not a job of the caller's.
unset MAKEFLAGS MFLAGS
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
passed=0
ok() { passed=$((passed + 1)); }
fail() { echo "install-test: $*"; exit 1; }
prefix=/opt/pconn-test
make -s install PREFIX=$prefix DESTDIR="$tmp" >/dev/null
root="$tmp$prefix"
test -L "$root/lib/libpconn.so"
soname=$(readelf -d "$root/lib/libpconn.so" | sed -n 's/.*SONAME.*\[\(.*\)\]/\1/p')
test -f "$root/lib/$soname"

# The program uses the HTTP catalog, so a static link needs libcurl and jansson.
cat > "$tmp/prog.c" <<'C'
#include <pconn.h>
#include <pconn_resolver.h>
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
    pconn_http_catalog_options_t o = {.url = "http://127.0.0.1:1/x", .format = PCONN_CATALOG_JSON};
    r = pconn_resolver_http_catalog(&o);
    if (r == NULL)
        return 1;
    pconn_resolver_free(r);
    printf("libpconn %s\n", pconn_version());
    return 0;
}
C
export PKG_CONFIG_PATH="$root/lib/pkgconfig"
# pkg-config prints the prefix the .pc names; point it into the scratch DESTDIR.
export PKG_CONFIG_SYSROOT_DIR="$tmp"
pkg-config --validate pconn || fail "pconn.pc does not validate"
version=$(pkg-config --modversion pconn)

# 1. Shared, with pkg-config.
cc -o "$tmp/prog" "$tmp/prog.c" $(pkg-config --cflags --libs pconn)
readelf -d "$tmp/prog" | grep -q "NEEDED.*\[$soname\]" || fail "shared: $soname not needed"
[ "$(LD_LIBRARY_PATH="$root/lib" "$tmp/prog")" = "libpconn $version" ] || fail "shared: wrong output"
ok

# 2. Static libpconn.a with pkg-config --static (its private dependencies come from
# Requires.private/Libs.private); the system libraries stay shared.
libs=$(pkg-config --static --libs pconn | sed 's/-lpconn\b/-l:libpconn.a/')
cc -o "$tmp/prog_static" "$tmp/prog.c" $(pkg-config --cflags pconn) $libs
! readelf -d "$tmp/prog_static" | grep -q 'NEEDED.*libpconn' || fail "static: links libpconn.so"
[ "$("$tmp/prog_static")" = "libpconn $version" ] || fail "static: wrong output"
# Without --static the same link must fail: the check above proves something.
if cc -o "$tmp/prog_nostatic" "$tmp/prog.c" $(pkg-config --cflags pconn) \
    $(pkg-config --libs pconn | sed 's/-lpconn\b/-l:libpconn.a/') 2>/dev/null; then
    fail "static: linked without the private libraries (is the program using libcurl?)"
fi
ok

# 3. CMake: find_package(pconn) with both imported targets; a version it does not
# satisfy is refused.
mkdir "$tmp/cm" "$tmp/cm/build"
cp "$tmp/prog.c" "$tmp/cm/"
cat > "$tmp/cm/CMakeLists.txt" <<CM
cmake_minimum_required(VERSION 3.13)
project(prog C)
find_package(pconn 2.0 QUIET)
if(pconn_FOUND)
  message(FATAL_ERROR "find_package(pconn 2.0) accepted pconn \${pconn_VERSION}")
endif()
find_package(pconn $version REQUIRED)
add_executable(prog prog.c)
target_link_libraries(prog PRIVATE pconn::pconn)
add_executable(prog_static prog.c)
target_link_libraries(prog_static PRIVATE pconn::pconn_static)
CM
(cd "$tmp/cm/build" && cmake -DCMAKE_PREFIX_PATH="$root" .. >"$tmp/cmake.log" 2>&1 &&
    make >>"$tmp/cmake.log" 2>&1) || { cat "$tmp/cmake.log"; fail "cmake: build failed"; }
[ "$(LD_LIBRARY_PATH="$root/lib" "$tmp/cm/build/prog")" = "libpconn $version" ] ||
    fail "cmake: wrong output (shared)"
! readelf -d "$tmp/cm/build/prog_static" | grep -q 'NEEDED.*libpconn' || fail "cmake: static links libpconn.so"
[ "$("$tmp/cm/build/prog_static")" = "libpconn $version" ] || fail "cmake: wrong output (static)"
ok

# 4. The shared library exports the public API and nothing else, all of it under the
# version node PCONN_0.
syms=$(objdump -T "$root/lib/$soname" | awk '$2 == "g" && $4 != "*UND*" {print $(NF-1), $NF}')
bad=$(echo "$syms" | awk '$2 != "PCONN_0" && $1 != "PCONN_0" {print}')
[ -z "$bad" ] || fail "unexpected or unversioned exported symbols: $bad"
internal=$(echo "$syms" | awk '$2 ~ /^pconn__/ || ($2 !~ /^pconn_/ && $2 != "PCONN_0") {print $2}')
[ -z "$internal" ] || fail "unexpected exported symbols: $internal"
ok

# 5. Each installed header compiles on its own.
for h in "$root"/include/pconn*.h; do
    cc -std=c11 -Wall -Wextra -Werror -fsyntax-only -x c "$h"
done
ok

# 6. Man pages: every page renders without a groff warning, and every exported function
# has a page (its own or a ".so" to its area's page).
man="$root/share/man"
for page in "$man"/man1/*.1 "$man"/man3/*.3; do
    [ -e "$page" ] || fail "no man pages installed"
    if head -n 1 "$page" | grep -q '^\.so '; then
        target="$man/$(head -n 1 "$page" | cut -d' ' -f2)"
        [ -f "$target" ] || fail "$(basename "$page") points to a missing $target"
        continue
    fi
    warn=$(groff -mandoc -Tutf8 -ww -z "$page" 2>&1) || fail "groff failed on $page"
    [ -z "$warn" ] || fail "groff warns on $(basename "$page"): $warn"
    MANWIDTH=80 man -l "$page" 2>/dev/null | grep -q . || fail "man -l shows nothing for $page"
done
[ -f "$man/man1/pconn.1" ] && [ -f "$man/man3/libpconn.3" ] || fail "pconn(1) or libpconn(3) missing"
grep -q "^\.Os libpconn $version\$" "$man/man3/libpconn.3" || fail "libpconn(3) does not say $version"
missing=""
for fn in $(echo "$syms" | awk '$2 ~ /^pconn_/ {print $2}'); do
    [ -f "$man/man3/$fn.3" ] || missing="$missing $fn"
done
[ -z "$missing" ] || fail "exported functions without a man page (add each to NAME and SYNOPSIS of its area's page in docs/man):$missing"
ok

# 7. The pages' SYNOPSIS agree with the headers: each prototype, compiled after the
# headers, must not conflict; the pages name exactly the exported functions, each in its
# page's SYNOPSIS.
pages=$(grep -L '^\.so ' "$man"/man3/*.3)
for page in $pages; do
    awk '/^\.Sh/ { syn = ($2 == "SYNOPSIS"); next }
         !syn { next }
         /^\.In / { print "#include <" $2 ">"; next }
         /^\.Ft / { t = substr($0, 5); next }
         /^\.Fn / { a = $0; sub(/^\.Fn [a-z_0-9]+ */, "", a); gsub(/^"|"$/, "", a)
                    gsub(/" "/, ", ", a); print t " " $2 "(" a ");"; t = "" }' "$page"
done > "$tmp/synopsis.c"
cc -std=c11 -Wall -Werror -fsyntax-only -I"$root/include" "$tmp/synopsis.c" 2>"$tmp/synopsis.log" ||
    { cat "$tmp/synopsis.log"; fail "a man page's SYNOPSIS disagrees with the headers"; }
named=$(sed -n 's/^\.Nm \(pconn_[a-z_0-9]*\).*/\1/p' $pages | sort)
in_synopsis=$(sed -n 's/.*[ *]\(pconn_[a-z_0-9]*\)(.*/\1/p' "$tmp/synopsis.c" | sort)
exported=$(echo "$syms" | awk '$2 ~ /^pconn_/ {print $2}' | sort)
[ "$named" = "$exported" ] || fail "pages name other functions than exported: $(echo "$named" "$exported" | tr ' ' '\n' | sort | uniq -u | tr '\n' ' ')"
[ "$named" = "$in_synopsis" ] || fail "NAME and SYNOPSIS differ: $(echo "$named" "$in_synopsis" | tr ' ' '\n' | sort | uniq -u | tr '\n' ' ')"
ok

# 8. pconn(1) and the installed tool agree: each subcommand of the SYNOPSIS answers
# --help with exit 0 on stdout and names each option the page gives it. (Until make
# install installs the tool, there is nothing to compare.)
if [ -x "$root/bin/pconn" ]; then
    awk '/^\.Sh/ { syn = ($2 == "SYNOPSIS"); next }
         !syn { next }
         /^\.Nm/ { if (line != "") print line; line = "-" }
         /^\.Cm / { line = $2 }
         /Fl Fl / { for (i = 1; i < NF; i++) if ($i == "Fl" && $(i + 1) == "Fl") line = line " --" $(i + 2) }
         END { if (line != "") print line }' "$man/man1/pconn.1" > "$tmp/commands"
    [ -s "$tmp/commands" ] || fail "pconn(1): no SYNOPSIS"
    while read -r cmd opts; do
        if [ "$cmd" = "-" ]; then
            "$root/bin/pconn" --help >/dev/null || fail "pconn --help: exit status not 0"
            "$root/bin/pconn" --version | grep -q "$version" || fail "pconn --version: not $version"
            continue
        fi
        out=$("$root/bin/pconn" $cmd --help) || fail "pconn $cmd --help: exit status not 0"
        for o in $opts; do
            echo "$out" | grep -q -- "$o" || fail "pconn $cmd --help does not name $o, which pconn(1) gives it"
        done
    done < "$tmp/commands"
    ok
fi

# 9. Uninstall leaves no file behind.
make -s uninstall PREFIX=$prefix DESTDIR="$tmp" >/dev/null
left=$(find "$tmp$prefix" -type f)
[ -z "$left" ] || fail "left after uninstall: $left"
ok
echo "install-test: $passed passed, 0 failed"
