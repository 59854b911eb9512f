# agent-vm: `make demo` runs the product end to end; `make test` runs the whole suite.
# Both set themselves up: Debian packages when root, a .venv, and pip packages.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTHON ?= python3
EXTRAS ?= dev
# Debian packages the product and its real tests use (checked with dpkg, installed only if missing).
APT_PACKAGES := git openssh-server openssh-client qemu-system-x86 qemu-utils systemd-container \
  mmdebstrap e2fsprogs nftables iproute2 busybox-static cpio lz4 zstd libvirt-dev pkg-config \
  chromium libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients shellcheck

.PHONY: setup apt venv test lint demo clean schemas bench

setup: apt venv

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then echo "apt: all packages present"; \
	elif [ "$$(id -u)" = 0 ]; then echo "apt: installing$$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else echo "apt: missing$$missing (not root: install them yourself)"; fi

$(VENV)/.stamp-$(EXTRAS): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) install -q --disable-pip-version-check -U pip 2>&1 | grep -v '^WARNING: Location' || true
	@$(PIP) install -q --disable-pip-version-check -e '.[$(EXTRAS)]' 2>&1 | grep -v '^WARNING: Location' || true
	@$(PY) -c 'import controlplane, click, pydantic, paramiko' && touch $@

venv: $(VENV)/.stamp-$(EXTRAS)

# the tests of the libvirt, gcp and sigstore code need their extras, and mypy checks those
# tests, so `make test` and `make lint` set up the same venv; `make demo` needs only dev
ALL_EXTRAS := dev,libvirt,gcp,sigstore
# pytest-xdist workers, each taking whole test files (a module's VM is booted once, on one
# worker); tests look only at what they made, so two workers share the machine like two runs
TEST_WORKERS ?= 2

test:
	@$(MAKE) --no-print-directory setup EXTRAS=$(ALL_EXTRAS)
	@$(PY) -c 'import libvirt, pulumi, pulumi_gcp, sigstore' 2>/dev/null || echo "WARNING: extras libvirt/gcp/sigstore not importable: their tests will fail" >&2
	$(VENV)/bin/pytest -n $(TEST_WORKERS) --dist loadfile --durations=25

lint:
	@$(MAKE) --no-print-directory setup EXTRAS=$(ALL_EXTRAS)
	$(VENV)/bin/ruff check controlplane tests bench
	$(VENV)/bin/ruff format --check controlplane tests bench
	$(VENV)/bin/mypy
	@# the layer contracts in pyproject.toml [tool.importlinter]
	$(VENV)/bin/lint-imports --no-cache
	@# the guest's busybox scripts (package data); excused findings: controlplane/guestscripts/.shellcheckrc
	shellcheck controlplane/guestscripts/*.sh

schemas: venv
	$(PY) -m controlplane.schemas receipts/schema

bench: setup
	$(PY) bench/cli.py
	$(PY) bench/receipts.py
	$(PY) bench/promote.py
	$(PY) bench/boot.py
	$(PY) bench/jobs.py

demo: setup
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
