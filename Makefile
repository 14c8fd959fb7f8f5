# fastscp: one entry point for setting up, serving, testing and benchmarking.
#   make serve   set up, then run the server on the embedded default config
#   make test    set up, then run the test suite (what .ci/run runs)
#   make fuzz    the hostile-peer fuzz test, 20000 runs per backend (make test runs 100)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# Debian packages: dcmtk (storescu/echoscu/findscu/storescp used by tests and
# benchmarks), the headers the compiled extensions and Pillow build with, and
# chromium (the status page is tested in a real headless browser), DejaVu
# fonts for scan sheets, systemd (systemd-analyze verifies the unit of
# `fastscp service install`), strace (tests count the fsync calls a server makes),
# orthanc (a forwarding destination in tests/e2e/test_forward.py),
# xorriso (the ISO 9660 image of `fastscp export dicomdir --iso`), util-linux-extra
# (fincore: tests read how much of a stored file the page cache holds). The data path's
# compiled loop hashes with BLAKE3's C code, built from cext/blake3.
APT_PACKAGES = dcmtk libjpeg62-turbo-dev zlib1g-dev chromium openssl fonts-dejavu-core systemd strace xorriso orthanc util-linux-extra

# Benchmarks also compare against Orthanc (Debian's package, its own SQLite index).
BENCH_APT_PACKAGES = orthanc
PIL_STOCK = bench/.pil-stock

# PostgreSQL and HAProxy (Debian's): tests/e2e/test_scaleout.py runs nodes on a
# DuckLake index whose catalog is in PostgreSQL, behind HAProxy, in network
# namespaces it makes with iproute2's ip.
APT_PACKAGES += postgresql haproxy iproute2

# apt-install is a helper target: make apt-install PACKAGES=...
.PHONY: setup system-packages pillow-simd bench-setup apt-install serve test lint fuzz mutation mutation-quick bench-micro bench-quick bench-load bench-nodes clean

setup: system-packages $(VENV)/.installed

system-packages:
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(APT_PACKAGES)"

bench-setup: setup
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(BENCH_APT_PACKAGES)"
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	@# The stock Pillow pip resolved (its metadata stays in the venv) beside
	@# the venv's PIL, so the JPEG micro-benchmark compares Pillow-SIMD and
	@# Pillow in one run.
	test -d $(PIL_STOCK)/PIL || $(BIN)/python -m pip install -q --no-deps --target $(PIL_STOCK) \
	  "pillow==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("pillow"))')"

apt-install:
	@missing=""; for p in $(PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# Re-installs when the project's build inputs change; compiles the .pyx files in place.
$(VENV)/.installed: pyproject.toml setup.py $(wildcard fastscp/*/*.pyx fastscp/*/*.pxd)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@$(MAKE) --no-print-directory pillow-simd
	touch $@

# JPEG encoding: Pillow-SIMD where it builds. It installs the same PIL package
# over stock Pillow's files (Pillow's metadata stays, so pip still counts it
# for dependants); where the build fails, stock Pillow stays in place. The
# server's start-up line says which one encodes ("JPEG: pillow-simd ...").
# -mavx2 where the CPU has it (Pillow-SIMD's own advice), else its SSE4 build.
pillow-simd:
	@CC="cc $$(grep -q avx2 /proc/cpuinfo && echo -mavx2)" \
	  $(BIN)/python -m pip install -q --no-deps --force-reinstall Pillow-SIMD \
	  || echo "Pillow-SIMD does not build here: JPEG encoding stays with stock Pillow"
	@$(BIN)/python -c "from fastscp.imaging import frames; print('JPEG encoder:', frames.PILLOW_FLAVOUR, frames.PILLOW_VERSION)" \
	  || $(BIN)/python -m pip install -q --force-reinstall --no-deps pillow

serve: setup
	$(BIN)/fastscp serve

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check fastscp tests bench

# Mutation testing (tests/README.md): every hand-written fault of
# tests/mutation/faults.py must be killed, then AST mutants of the modules in
# tests/mutation/__main__.py MODULES run against their tests; reports in
# build/mutation/. Hours on the full set. mutation-quick is the CI subset
# (under two minutes): the quick faults and 15 mutants each of layout and access.
mutation: setup
	$(BIN)/python -m tests.mutation faults
	$(BIN)/python -m tests.mutation mutants --all

mutation-quick: setup
	$(BIN)/python -m tests.mutation quick

bench-micro: bench-setup
	mkdir -p bench/results
	$(BIN)/python -m pytest bench --benchmark-only --benchmark-json=bench/results/micro.json

# End to end, fastscp against dcmtk storescp, Orthanc and pynetdicom's app:
# quick (< 2 min, CI: fails on lost or corrupted files, never on speed) and full;
# then one association's thread against storescp's process (bench/store_thread.py), quick: that it runs.
bench-quick: bench-setup
	$(BIN)/python -m bench.load --quick
	$(BIN)/python -m bench.store_thread --quick

bench-load: bench-setup
	$(BIN)/python -m bench.load

# 1, 2 and 3 nodes on one DuckLake index behind HAProxy (README "Scale-out").
bench-nodes: bench-setup
	$(BIN)/python -m bench.nodes

clean:
	rm -rf build *.egg-info fastscp/*/*.so fastscp/*/*.c $(VENV) $(PIL_STOCK)

# The fuzz test of tests/e2e/test_hostile.py (seeded mutations of a valid
# association, sent raw) with many more runs than `make test` does (100).
# FUZZ_SEED picks another sequence of mutations.
FUZZ_RUNS ?= 20000
FUZZ_SEED ?= 11
fuzz: setup
	FASTSCP_FUZZ_RUNS=$(FUZZ_RUNS) FASTSCP_FUZZ_SEED=$(FUZZ_SEED) $(BIN)/python -m pytest tests/e2e/test_hostile.py -k fuzz -q
