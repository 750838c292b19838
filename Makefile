# Humans and CI use the same commands: `make run` and `make test` are the README's two set-up
# commands. Each creates (or reuses) the virtual environment and installs what it needs,
# Debian/Ubuntu packages included (as root, or through sudo).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test test-fast lint typecheck format bench fuzz soak overload clean system-deps

system-deps:
	@if command -v apt-get >/dev/null; then \
		pkgs=$$(grep -hv '^\s*#' requirements-apt.txt | xargs); \
		missing=$$(for p in $$pkgs; do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done | xargs); \
		if [ -n "$$missing" ]; then \
			echo "Installing Debian packages: $$missing"; \
			$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
		fi; \
	else echo "apt-get not found: install the packages in requirements-apt.txt yourself"; fi

$(STAMP): pyproject.toml requirements-apt.txt $(wildcard requirements-ansible.txt)
	$(MAKE) system-deps
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q -e '.[dev,jetson]' $(if $(wildcard requirements-ansible.txt),-r requirements-ansible.txt)
	# TensorRT itself only installs on Jetson; its stubs let mypy check the backend anywhere.
	# tensorrt-stubs 10.13.0.35.1 lacks py.typed and is not valid Python in two places (a
	# parameter named `in`, a required parameter after defaulted ones): fix the installed copy.
	$(PY) -m pip install -q --no-deps 'tensorrt-stubs==10.13.0.35.1'
	site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
	sed -i -E 's/([(, ])in: /\1in_: /g; s/power: Weights = None, channel_axis: int\)/power: Weights = None, channel_axis: int = ...)/' $$site/tensorrt_bindings/tensorrt.pyi && \
	touch $$site/tensorrt/py.typed $$site/tensorrt_bindings/py.typed
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/appliance serve --fallback-demo

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check appliance tests benchmarks
	$(VENV)/bin/ruff format --check appliance tests benchmarks
	$(VENV)/bin/mypy appliance

typecheck: $(STAMP)
	$(VENV)/bin/mypy appliance

format: $(STAMP)
	$(VENV)/bin/ruff format appliance tests benchmarks
	$(VENV)/bin/ruff check --fix appliance tests benchmarks

# Coverage-guided fuzzing (atheris) of the image decoder and the URL guard, FUZZ_SECONDS per
# target; new interesting inputs are added to tests/corpus/<target> (commit the good ones),
# crashes land in test-artifacts/fuzz/. CI runs a bounded number of inputs (tests/test_fuzz_atheris.py).
FUZZ_SECONDS ?= 600
fuzz: $(STAMP)
	mkdir -p test-artifacts/fuzz
	FUZZ_TARGET=images $(PY) -m tests.fuzz_target -max_total_time=$(FUZZ_SECONDS) \
		-dict=tests/corpus/images.dict -artifact_prefix=test-artifacts/fuzz/ tests/corpus/images
	FUZZ_TARGET=urls $(PY) -m tests.fuzz_target -max_total_time=$(FUZZ_SECONDS) \
		-artifact_prefix=test-artifacts/fuzz/ tests/corpus/urls

# REST and streams together against `appliance serve` for SOAK_SECONDS (CI runs 60 s in
# `make test`): RSS growth after warm-up under 5 %, file descriptors and threads back to
# baseline (tests/test_overload.py). `make overload` prints the overload benchmark's numbers.
SOAK_SECONDS ?= 1800
soak: $(STAMP)
	SOAK_SECONDS=$(SOAK_SECONDS) $(PY) -m pytest -q -s -p no:cacheprovider tests/test_overload.py -k soak

OVERLOAD_SECONDS ?= 60
overload: $(STAMP)
	$(PY) benchmarks/overload.py overload --seconds $(OVERLOAD_SECONDS)

bench: $(STAMP)
	$(PY) benchmarks/serving_overhead.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache test-artifacts
