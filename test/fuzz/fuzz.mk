# libFuzzer targets (clang). `make fuzz` builds them and runs each for FUZZ_SECONDS,
# starting from the seed corpus in test/fuzz/corpus/<target>/; what it finds new goes
# to build/fuzz/corpus-<target>/, crashes to build/fuzz/.
FUZZ_CC      ?= clang
FUZZ_SECONDS ?= 60
FUZZ_FLAGS   := -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
                -std=c11 -D_GNU_SOURCE -Iinclude -Isrc -Iresolvers
F := build/fuzz

FUZZ_NAMES := fuzz_catalog fuzz_frame

$(F)/fuzz_catalog: test/fuzz/fuzz_catalog.c resolvers/catalog_parse.c src/address.c src/error.c
	@mkdir -p $(F)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ $^ -ljansson

$(F)/fuzz_frame: test/fuzz/fuzz_frame.c src/rpc/wire.c
	@mkdir -p $(F)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ $^

.PHONY: fuzz-build fuzz-run
fuzz-build: $(addprefix $(F)/,$(FUZZ_NAMES))

fuzz-run: fuzz-build
	@for t in $(FUZZ_NAMES); do \
	    mkdir -p $(F)/corpus-$${t#fuzz_}; \
	    echo "== $$t for $(FUZZ_SECONDS) s"; \
	    $(F)/$$t -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=$(F)/ -print_final_stats=1 \
	        $(F)/corpus-$${t#fuzz_} test/fuzz/corpus/$${t#fuzz_} || exit 1; \
	done
