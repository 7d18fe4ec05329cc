# libpconn - plain Makefile.
#   make                 libpconn.a, libpconn.so, pconn.pc, samples
#   make check           install missing packages, build, run every test
#   make demo            install missing packages, build, show failover live
#   make bench           benchmarks (not part of check)
#   make fuzz            libFuzzer targets (clang)
#   make install         PREFIX=/usr/local DESTDIR=
#   SANITIZE=address|thread builds everything instrumented, in its own build directory.

VERSION := $(shell sed -n 's/^\#define PCONN_VERSION_STRING "\(.*\)"/\1/p' include/pconn.h)
MAJOR   := $(shell sed -n 's/^\#define PCONN_VERSION_MAJOR //p' include/pconn.h)
SONAME  := libpconn.so.$(MAJOR)

PREFIX     ?= /usr/local
LIBDIR     ?= $(PREFIX)/lib
INCLUDEDIR ?= $(PREFIX)/include
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
DEPLIBS := -lcurl -ljansson

LIB_SRC := $(wildcard src/*.c resolvers/*.c)
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
        stress stress-build

all: lib $(SAMPLES)
lib: $(B)/libpconn.a $(B)/$(SONAME) $(B)/pconn.pc

deps:
	@test/deps.sh

$(B)/%.o: %.c $(HEADERS) $(wildcard src/*.h resolvers/*.h test/*.h test/bench/*.h)
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
	$(Q)$(CC) -o $@ $^ $(LDFLAGS) $(DEPLIBS) -lcunit -lzmq -lm

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
bench: deps
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

install: lib
	install -d $(DESTDIR)$(LIBDIR)/pkgconfig $(DESTDIR)$(INCLUDEDIR)
	install -m 644 $(HEADERS) $(DESTDIR)$(INCLUDEDIR)/
	install -m 644 $(B)/libpconn.a $(DESTDIR)$(LIBDIR)/
	install -m 755 $(B)/$(SONAME) $(DESTDIR)$(LIBDIR)/
	ln -sf $(SONAME) $(DESTDIR)$(LIBDIR)/libpconn.so
	$(PC_SED) pconn.pc.in > $(DESTDIR)$(LIBDIR)/pkgconfig/pconn.pc

uninstall:
	rm -f $(addprefix $(DESTDIR)$(INCLUDEDIR)/,$(notdir $(HEADERS)))
	rm -f $(DESTDIR)$(LIBDIR)/libpconn.a $(DESTDIR)$(LIBDIR)/libpconn.so $(DESTDIR)$(LIBDIR)/$(SONAME)
	rm -f $(DESTDIR)$(LIBDIR)/pkgconfig/pconn.pc

lint: deps
	cppcheck --quiet --error-exitcode=1 --enable=warning,performance,portability \
	    --inline-suppr --std=c11 -D_GNU_SOURCE -Iinclude -Isrc src resolvers

clean:
	rm -rf build test/bench/results.json
