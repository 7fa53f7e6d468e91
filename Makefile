# Two entry points: `make run` (install and serve the demo) and `make test` (install
# what tests need, start the databases if they are down, run every check).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PG_URL ?= postgresql://postgres@127.0.0.1:5432/test

.PHONY: run test lint services chromium bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/jobwire serve

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests bench examples
	$(BIN)/mypy

# React and esbuild for the React browser tests (tests/browser/react), from its lock file.
REACT_HARNESS := tests/browser/react
$(REACT_HARNESS)/node_modules/.installed: $(REACT_HARNESS)/package-lock.json
	npm ci --prefix $(REACT_HARNESS) --no-audit --no-fund --loglevel=error
	touch $@

# Test files run in two processes (pytest-xdist): most of the time a test waits on servers
# and workers it started, so two at once roughly halve the wall time on 2 CPUs.
PYTEST_ARGS ?= -n 2 --dist loadfile

test: $(VENV)/.installed-test services chromium lint $(REACT_HARNESS)/node_modules/.installed
	node --test tests/js/
	JOBWIRE_TEST_PG=$${JOBWIRE_TEST_PG:-$(PG_URL)} $(BIN)/pytest $(PYTEST_ARGS)

$(VENV)/.installed-bench: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[bench]'
	touch $@

# The benchmarks beside the peers, then charts (bench/README.md). A quick look:
# make bench BENCH_JOBS=2000 BENCH_ARGS="--reps 1"
BENCH_JOBS ?= 20000
bench: $(VENV)/.installed-bench services
	$(BIN)/python -m bench.throughput --jobs $(BENCH_JOBS) $(BENCH_ARGS)
	$(BIN)/python -m bench.progress $(BENCH_ARGS)
	$(BIN)/python -m bench.dedup $(BENCH_ARGS)
	$(BIN)/python -m bench.submits $(BENCH_ARGS)
	$(BIN)/python -m bench.idle $(BENCH_ARGS)
	$(BIN)/python -m bench.growth $(BENCH_ARGS)
	$(BIN)/python -m bench.charts
	$(BIN)/python -m bench.targets

# PostgreSQL and Redis normally run already; start them if not.
services:
	@pg_isready -q -h 127.0.0.1 -p 5432 || pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start
	@for i in $$(seq 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
	@redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 || redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log

# Debian's Chromium for the browser tests; never a downloaded browser.
chromium:
	@test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache test-artifacts jobwire.db*
