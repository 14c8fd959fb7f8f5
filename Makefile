# fastscp: one entry point for setting up, serving, testing and benchmarking.
#   make serve   set up, then run the server on the embedded default config
#   make test    set up, then run the test suite (what .ci/run runs)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# Debian packages: dcmtk (storescu/echoscu/findscu/storescp used by tests and
# benchmarks), the headers the compiled extensions and Pillow build with, and
# chromium (the status page is tested in a real headless browser), DejaVu
# fonts for scan sheets.
APT_PACKAGES = dcmtk libjpeg62-turbo-dev zlib1g-dev chromium openssl fonts-dejavu-core

# Benchmarks also compare against Orthanc (Debian's package, its own SQLite index).
BENCH_APT_PACKAGES = orthanc

# apt-install is a helper target: make apt-install PACKAGES=...
.PHONY: setup system-packages bench-setup apt-install serve test lint bench-micro bench-quick bench-load clean

setup: system-packages $(VENV)/.installed

system-packages:
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(APT_PACKAGES)"

bench-setup: setup
	@$(MAKE) --no-print-directory apt-install PACKAGES="$(BENCH_APT_PACKAGES)"
	$(BIN)/python -m pip install -q -e '.[test,bench]'

apt-install:
	@missing=""; for p in $(PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# Re-installs when the project's build inputs change; compiles cext/ in place.
$(VENV)/.installed: pyproject.toml setup.py $(wildcard cext/*.pyx cext/*.pxd)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

serve: setup
	$(BIN)/fastscp serve

test: setup
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check fastscp tests bench

bench-micro: bench-setup
	mkdir -p bench/results
	$(BIN)/python -m pytest bench --benchmark-only --benchmark-json=bench/results/micro.json

# End to end, fastscp against dcmtk storescp, Orthanc and pynetdicom's app:
# quick (< 2 min, CI: fails on lost or corrupted files, never on speed) and full.
bench-quick: bench-setup
	$(BIN)/python -m bench.load --quick

bench-load: bench-setup
	$(BIN)/python -m bench.load

clean:
	rm -rf build *.egg-info fastscp/*.so cext/*.c $(VENV)
