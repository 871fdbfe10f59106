# nitro-vsock-proxy — the two commands a newcomer needs:
#   make demo   runs the proxy end to end on this machine (stand-in transports, no AWS needed)
#   make test   installs what a fresh Debian machine lacks, then runs every check and test
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all build release deps test lint unit-test integration-test bench demo clean

all: build

build:
	$(CARGO) build --workspace

release:
	$(CARGO) build --workspace --release

# Debian packages the build and the tests need. Installs only what is missing, and says so.
deps:
	@scripts/install-deps.sh

test: deps lint
	$(CARGO) test --workspace --all-targets
	@echo "make test: all checks passed"

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit-test:
	$(CARGO) test --workspace --lib --bins

integration-test:
	$(CARGO) test --workspace --tests

bench: deps
	$(CARGO) bench --bench relay

demo: deps
	@scripts/demo.sh

clean:
	$(CARGO) clean
