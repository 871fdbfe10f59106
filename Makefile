# nitro-vsock-proxy — the two commands a newcomer needs:
#   make demo   runs the proxy end to end on this machine (stand-in transports, no AWS needed)
#   make test   installs what a fresh Debian machine lacks, then runs every check and test
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all build release deps test lint unit-test integration-test vm-test vm-test-tier1 vm-test-tier2 rpm rpm-test deb deb-test bench demo clean

all: build

build:
	$(CARGO) build --workspace

release:
	$(CARGO) build --workspace --release

# Debian packages the build and the tests need. Installs only what is missing, and says so.
deps:
	@scripts/install-deps.sh

test: deps lint vm-test
	$(CARGO) test --workspace --all-targets
	@ONLINE= scripts/demo.sh  # the demo, offline, is part of the tests
	@$(MAKE) --no-print-directory rpm-test deb-test
	@echo "make test: all checks passed"

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit-test:
	$(CARGO) test --workspace --lib --bins

integration-test:
	$(CARGO) test --workspace --tests

# Real AF_VSOCK in throwaway qemu VMs (tests/vm/README.md), both tiers: fetches qemu and a kernel
# from Debian into target/vm-cache on first use. Fails, never skips, if it cannot run.
#   tier 1: the daemon and enclave-app over vsock in a busybox VM
#   tier 2: systemd as PID 1 in a Debian 12 VM (rootfs built once with debootstrap, as root):
#           the RPM installed, the units started, reloaded, stopped, socket-activated, upgraded
#           and removed
vm-test: deps
	@tests/vm/run.sh tier1
	@tests/vm/run.sh tier2

vm-test-tier1: deps
	@tests/vm/run.sh tier1

vm-test-tier2: deps
	@tests/vm/run.sh tier2

# The RPM for Amazon Linux 2023 (packaging/rpm/), built with Debian's rpmbuild into target/rpm/.
rpm: deps
	@scripts/build-rpm.sh

# Checks the built RPM: file list, no path shared with AWS's package, rpmlint, glibc <= 2.34,
# install/remove in a throwaway root.
rpm-test: rpm
	@tests/packaging/rpm-test.sh

# The .deb for Debian/Ubuntu parents, into target/deb/, and its checks.
deb: deps
	@scripts/build-deb.sh

deb-test: deb
	@tests/packaging/deb-test.sh

# The egress rows need enclave-app next to the daemon (target/release/).
bench: deps
	$(CARGO) build --release -p enclave-app
	$(CARGO) bench --bench relay

# The workshop chain on this machine, offline; ONLINE=1 uses the real ip-ranges.amazonaws.com.
demo:
	@scripts/install-deps.sh demo
	@ONLINE=$(ONLINE) scripts/demo.sh

clean:
	$(CARGO) clean
