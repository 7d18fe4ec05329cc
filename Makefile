# libpconn - plain Makefile.
#   make                 libpconn.a, libpconn.so, pconn.pc, samples
#   make check           install missing packages, build, run every test
#   make demo            install missing packages, build, show failover live
#   make bench           benchmarks (not part of check)
#   make fuzz            libFuzzer targets (clang)
#   make install         PREFIX=/usr/local DESTDIR= (the tool, library, headers, pkg-config, CMake, man pages)
#   make abi-check       abidiff of the shared library against the last release tag
#   SANITIZE=address|thread builds everything instrumented, in its own build directory.

VERSION := $(shell sed -n 's/^\#define PCONN_VERSION_STRING "\(.*\)"/\1/p' include/pconn.h)
MAJOR   := $(shell sed -n 's/^\#define PCONN_VERSION_MAJOR //p' include/pconn.h)
SONAME  := libpconn.so.$(MAJOR)

PREFIX     ?= /usr/local
BINDIR     ?= $(PREFIX)/bin
LIBDIR     ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
MANDIR     ?= $(PREFIX)/share/man
CMAKEDIR   ?= $(LIBDIR)/cmake/pconn
DESTDIR    ?=

CC       ?= cc
SANITIZE ?=
OPT      ?= -O2 -g
WARN     := -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes -Wmissing-prototypes
BASE     := -std=c11 -D_GNU_SOURCE -pthread $(OPT) $(WARN) -Iinclude -Isrc

ifeq ($(SANITIZE),address)
  SAN := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all
else ifeq ($(SANITIZE),thread)
  SAN := -fsanitize=thread
else ifneq ($(SANITIZE),)
  $(error SANITIZE must be address or thread)
endif

B       := build/$(or $(SANITIZE),plain)
# V=1 shows the commands.
Q       := $(if $(V),,@)
CFLAGS  += $(BASE) $(SAN)
LDFLAGS += $(SAN) -pthread
DEPLIBS := -lcurl -ljansson -lssl -lcrypto

LIB_SRC := $(wildcard src/*.c src/rpc/*.c resolvers/*.c)
LIB_OBJ := $(LIB_SRC:%.c=$(B)/%.o)
HEADERS := $(wildcard include/*.h)

TEST_SUITES := $(patsubst test/%.c,%,$(wildcard test/test_*.c))
# The torture suite replaces malloc: not with the sanitizers' own allocators.
ifneq ($(SANITIZE),)
  TEST_SUITES := $(filter-out test_torture,$(TEST_SUITES))
endif
TEST_COMMON := $(patsubst %.c,$(B)/%.o,$(wildcard test/common*.c))
TEST_BINS   := $(TEST_SUITES:%=$(B)/test/%)
SAMPLES     := $(patsubst samples/%.c,$(B)/samples/%,$(wildcard samples/*.c))
# The Redis sample needs hiredis (test/deps.sh installs it); without it, it is left out.
HAVE_HIREDIS := $(shell printf '\043include <hiredis/hiredis.h>\n' | $(CC) -E -x c - >/dev/null 2>&1 && echo 1)
ifneq ($(HAVE_HIREDIS),1)
  SAMPLES := $(filter-out $(B)/samples/redis_counter,$(SAMPLES))
endif
BENCH_BINS  := $(patsubst test/bench/%.c,$(B)/bench/%,$(wildcard test/bench/bench_*.c))
STRESS_BINS := $(patsubst test/stress/%.c,$(B)/stress/%,$(wildcard test/stress/*.c))
# make stress: the chaos soak, STRESS_ROUNDS rounds (CI runs a short one).
STRESS_ROUNDS ?= 1000

.SECONDARY:
.PHONY: all lib check demo bench bench-build fuzz fuzz-build install uninstall clean deps lint tests \
        stress stress-build abi-check

all: lib $(SAMPLES)
lib: $(B)/libpconn.a $(B)/$(SONAME) $(B)/pconn.pc

deps:
	@test/deps.sh

$(B)/%.o: %.c $(HEADERS) $(wildcard src/*.h src/rpc/*.h resolvers/*.h test/*.h test/bench/*.h)
	@mkdir -p $(dir $@)
	@echo "  CC      $<"
	$(Q)$(CC) $(CFLAGS) -fPIC -c $< -o $@

$(B)/libpconn.a: $(LIB_OBJ)
	@echo "  AR      $@"
	$(Q)rm -f $@ && ar rcs $@ $^

$(B)/$(SONAME): $(LIB_OBJ) src/pconn.map
	@echo "  LD      $@"
	$(Q)$(CC) -shared -Wl,-soname,$(SONAME) -Wl,--version-script=src/pconn.map -o $@ $(LIB_OBJ) $(LDFLAGS) $(DEPLIBS)
	$(Q)ln -sf $(SONAME) $(B)/libpconn.so

PC_SED := sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$(LIBDIR)|' \
	-e 's|@INCLUDEDIR@|$(INCLUDEDIR)|' -e 's|@VERSION@|$(VERSION)|'

# The CMake package finds the library next to itself ($(CMAKEDIR) is two levels below
# $(LIBDIR)) and the headers by a path relative to itself, so it can be moved.
MINOR := $(shell sed -n 's/^\#define PCONN_VERSION_MINOR //p' include/pconn.h)
SIZEOF_VOID_P := $(shell $(CC) -dM -E -x c /dev/null | sed -n 's/^\#define __SIZEOF_POINTER__ //p')
CMAKE_SED = sed -e 's|@VERSION@|$(VERSION)|g' -e 's|@MAJOR@|$(MAJOR)|g' -e 's|@MINOR@|$(MINOR)|g' \
	-e 's|@SIZEOF_VOID_P@|$(SIZEOF_VOID_P)|g' \
	-e "s|@CMAKE_TO_INCLUDEDIR@|$$(realpath -m --relative-to=$(CMAKEDIR) $(INCLUDEDIR))|g"

# Man pages (mdoc): each section-3 page also answers to every function it names in .Nm,
# through a one-line ".so" page installed under that name.
MAN1 := $(wildcard docs/man/*.1)
MAN3 := $(wildcard docs/man/*.3)

$(B)/pconn.pc: pconn.pc.in include/pconn.h
	$(Q)$(PC_SED) $< > $@

$(B)/test/%: $(B)/test/%.o $(TEST_COMMON) $(B)/libpconn.a
	@echo "  LINK    $@"
	$(Q)$(CC) -o $@ $^ $(LDFLAGS) $(DEPLIBS) -lcunit

$(B)/samples/%: $(B)/samples/%.o $(B)/libpconn.a
	@echo "  LINK    $@"
	$(Q)$(CC) -o $@ $^ $(LDFLAGS) $(DEPLIBS)

$(B)/bench/%: $(B)/test/bench/%.o $(TEST_COMMON) $(B)/libpconn.a
	@mkdir -p $(dir $@)
	@echo "  LINK    $@"
	$(Q)$(CC) -o $@ $^ $(LDFLAGS) $(DEPLIBS) -lcunit -lzmq -lnng -lm

$(B)/samples/redis_counter: LDFLAGS += -lhiredis

# The fault suite wraps the system calls the library makes (see test/test_faults.c).
$(B)/test/test_faults: LDFLAGS += -Wl,--wrap=connect,--wrap=send,--wrap=sendmsg,--wrap=recv \
	-Wl,--wrap=read,--wrap=write,--wrap=poll,--wrap=malloc,--wrap=calloc,--wrap=pthread_create

$(B)/stress/%: $(B)/test/stress/%.o $(TEST_COMMON) $(B)/libpconn.a
	@mkdir -p $(dir $@)
	@echo "  LINK    $@"
	$(Q)$(CC) -o $@ $^ $(LDFLAGS) $(DEPLIBS) -lcunit

tests: $(TEST_BINS) $(SAMPLES)

check: deps
	@$(MAKE) --no-print-directory lib tests
	test/run-tests.sh $(B) "$(SANITIZE)"
	@if [ -z "$(SANITIZE)" ]; then test/install-test.sh; fi

demo: deps
	@$(MAKE) --no-print-directory $(B)/samples/demo $(B)/samples/pconn
	@echo "== 1. failover between two local servers (static list)"
	$(B)/samples/demo tcp
	@echo "== 2. RPC calls every 100 ms while the server in use hangs (heartbeats)"
	$(B)/samples/demo rpc
	@echo; echo "== 3. following a service catalog (a local etcd)"
	samples/demo-catalog.sh $(B)

bench-build: $(BENCH_BINS)
bench:
	@test/deps.sh bench
	@$(MAKE) --no-print-directory bench-build
	test/bench/run.sh $(B)

stress-build: $(STRESS_BINS) $(B)/samples/pconn
stress: deps
	@$(MAKE) --no-print-directory stress-build
	test/stress/run.sh $(B) "$(SANITIZE)" $(STRESS_ROUNDS)

fuzz: deps
	@$(MAKE) --no-print-directory -f test/fuzz/fuzz.mk fuzz-run

fuzz-build:
	@$(MAKE) --no-print-directory -f test/fuzz/fuzz.mk fuzz-build

install: lib $(B)/samples/pconn
	install -d $(DESTDIR)$(LIBDIR)/pkgconfig $(DESTDIR)$(INCLUDEDIR) $(DESTDIR)$(CMAKEDIR) \
	    $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man3 $(DESTDIR)$(BINDIR)
	install -m 755 $(B)/samples/pconn $(DESTDIR)$(BINDIR)/pconn
	install -m 644 $(HEADERS) $(DESTDIR)$(INCLUDEDIR)/
	install -m 644 $(B)/libpconn.a $(DESTDIR)$(LIBDIR)/
	install -m 755 $(B)/$(SONAME) $(DESTDIR)$(LIBDIR)/
	ln -sf $(SONAME) $(DESTDIR)$(LIBDIR)/libpconn.so
	$(PC_SED) pconn.pc.in > $(DESTDIR)$(LIBDIR)/pkgconfig/pconn.pc
	$(CMAKE_SED) cmake/pconnConfig.cmake.in > $(DESTDIR)$(CMAKEDIR)/pconnConfig.cmake
	$(CMAKE_SED) cmake/pconnConfigVersion.cmake.in > $(DESTDIR)$(CMAKEDIR)/pconnConfigVersion.cmake
	$(Q)for page in $(MAN1) $(MAN3); do \
	    sed 's/^\.Os libpconn.*/.Os libpconn $(VERSION)/' $$page > \
	        $(DESTDIR)$(MANDIR)/man$${page##*.}/$$(basename $$page); \
	done
	$(Q)for page in $(MAN3); do \
	    for fn in $$(sed -n 's/^\.Nm \([a-z_]*\).*/\1/p' $$page | sort -u); do \
	        [ -e docs/man/$$fn.3 ] || echo ".so man3/$$(basename $$page)" > $(DESTDIR)$(MANDIR)/man3/$$fn.3; \
	    done; \
	done

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/pconn
	rm -f $(addprefix $(DESTDIR)$(INCLUDEDIR)/,$(notdir $(HEADERS)))
	rm -f $(DESTDIR)$(LIBDIR)/libpconn.a $(DESTDIR)$(LIBDIR)/libpconn.so $(DESTDIR)$(LIBDIR)/$(SONAME)
	rm -f $(DESTDIR)$(LIBDIR)/pkgconfig/pconn.pc
	rm -f $(DESTDIR)$(CMAKEDIR)/pconnConfig.cmake $(DESTDIR)$(CMAKEDIR)/pconnConfigVersion.cmake
	-rmdir $(DESTDIR)$(CMAKEDIR) 2>/dev/null
	rm -f $(addprefix $(DESTDIR)$(MANDIR)/man1/,$(notdir $(MAN1)))
	$(Q)for page in $(MAN3); do \
	    for fn in $$(sed -n 's/^\.Nm \([a-z_]*\).*/\1/p' $$page | sort -u) $$(basename $$page .3); do \
	        rm -f $(DESTDIR)$(MANDIR)/man3/$$fn.3; \
	    done; \
	done

# The ABI of libpconn.so against the newest release tag (vX.Y.Z), with libabigail's
# abidiff: exit 0 when compatible. Without a tag or without abidiff it says so and passes.
ABI_TAG = $(shell git describe --tags --abbrev=0 --match 'v[0-9]*' 2>/dev/null)
abi-check: lib
	@test/abi-check.sh $(B) "$(ABI_TAG)"

lint: deps
	cppcheck --quiet --error-exitcode=1 --enable=warning,performance,portability \
	    --inline-suppr --std=c11 -D_GNU_SOURCE -Iinclude -Isrc src resolvers

clean:
	rm -rf build test/bench/results.json
