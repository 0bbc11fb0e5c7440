# Compliance Copilot Mesh. `make run` starts the mesh; `make test` runs the whole suite.
# Both set up what they need first (scripts/setup.sh is idempotent).
SHELL := /bin/bash
VENV := .venv/bin
export PATH := $(CURDIR)/.venv/bin:$(CURDIR)/node_modules/.bin:$(PATH)

.PHONY: setup config-docs run test unit integration lint gen check-gen buf-lint buf-breaking bench-edge bench-fairness bench-retrieval bench-tenants bench-answer bench-audit bench-load bench-fuzz bench-bounds bench-failover clean

setup:
	@scripts/setup.sh

run: setup
	$(VENV)/copilot up

## Regenerate docs/configuration.md from the settings model.
config-docs: setup
	$(VENV)/python scripts/config_docs.py

## Regenerate gen/ (Python and TypeScript) from proto/.
gen: setup
	scripts/gen.sh

## Fail when gen/ is not what proto/ generates.
check-gen: setup
	@tmp=$$(mktemp -d) && trap 'rm -rf $$tmp' EXIT && scripts/gen.sh $$tmp/gen && \
	  diff -r gen $$tmp/gen >/dev/null || { echo "gen/ is stale: run 'make gen'"; diff -r gen $$tmp/gen | head -20; exit 1; }
	@echo "gen/ is up to date"

buf-lint: setup
	buf lint

## Wire/JSON compatibility against the previous commit (skipped on the first commit).
buf-breaking: setup
	@if git rev-parse -q --verify HEAD~1 >/dev/null 2>&1 && git ls-tree -d HEAD~1 proto >/dev/null 2>&1 \
	    && [ -n "$$(git ls-tree HEAD~1 proto)" ]; then \
	  buf breaking --against '.git#ref=HEAD~1' && echo "buf breaking: no breaking change against HEAD~1"; \
	else echo "buf breaking: no previous commit with proto/ to compare against"; fi

lint: setup buf-lint buf-breaking
	$(VENV)/ruff check .
	$(VENV)/mypy
	$(VENV)/lint-imports --no-cache --no-logo
	$(VENV)/python scripts/config_docs.py --check
	tsc -p web

unit: setup
	$(VENV)/pytest -q tests/unit

integration: setup
	$(VENV)/pytest -q tests/integration

test: setup check-gen lint
	$(VENV)/pytest -q -p no:cacheprovider tests

## Same cheap RPC direct and through Envoy (JWT + rate limit), RPS and p50/p99.
bench-edge: setup
	$(VENV)/python -m bench.edge

## One tenant at 20x its limit, nine at half theirs: per-tenant RPS, errors, p99; edge added latency.
bench-fairness: setup
	$(VENV)/python -m bench.fairness

## BM25 / dense / hybrid quality, ingestion vs model throughput, search latency via Envoy.
bench-retrieval: setup
	$(VENV)/python -m bench.retrieval

## 10,000 tenants on the embedded store: provisioning p50/p99, RSS vs tenant count, cold vs warm first query.
bench-tenants: setup
	$(VENV)/python -m bench.tenants

## Answer through the edge (extractive, 1,000 passages) at concurrency 1/8/32: RPS, p50/p99, overhead.
bench-answer: setup
	$(VENV)/python -m bench.answer

## The answer path with and without the audit trail (on / off / on again, same run): p50/p99.
bench-audit: setup
	$(VENV)/python -m bench.audit

## The load suite (issue 7): 100 tenants, mix closed/open loop, bare ceiling, tenant cost curve,
## 10-minute soak; writes docs/benchmarks.md. ARGS="--quick" for a smoke run.
bench-load: setup
	$(VENV)/python -m bench.loadsuite $(ARGS)

## Hostile input for the nightly run: the suite's fuzzer (every copilot.v1 RPC through the edge) with
## many more examples on a mesh of its own. ARGS="--examples 5000 --seconds 1200".
bench-fuzz: setup
	$(VENV)/python -m bench.fuzz $(ARGS)

## 2,000 calls opened and abandoned through the edge: services' RSS before/after, open streams after.
bench-bounds: setup
	$(VENV)/python -m bench.bounds $(ARGS)

## 2 replicas of generation and the edge companion under an open-loop mix; one of each killed
## (SIGKILL) and restarted in turn: per phase ok/s, errors, p99, time to serve again; billing exact.
bench-failover: setup
	$(VENV)/python -m bench.failover $(ARGS)

clean:
	rm -rf .stamps .copilot test-artifacts
