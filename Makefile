# `make demo` and `make test` do all the set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is pinned here (pyproject declares a range) because pip takes the CPU build
# that lies on these machines' disk; a plain `torch` would download a multi-GB CUDA build.
TORCH := torch==2.13.0

# The report's test renders it in headless Chromium, Debian's package; installed here if missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv demo test bench clean browser deepspeed

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,examples]'
	touch $@

# Data-parallel training of the seed CNN on 2 local workers, with a progress bar and a summary.
demo: venv
	$(VENV)/bin/plait train examples/digits_cnn.toml --nproc 2

test: venv browser
	$(PY) -m pytest -q tests

browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  echo "make: installing chromium (Debian's package) for the report's browser test"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium; }

# DeepSpeed, the second peer of benchmarks/zero.py (CPU, gloo). Built without pip's isolation:
# its setup imports torch, and an isolated build would download a CUDA torch to import. No
# compiled ops (DS_BUILD_OPS=0): the benchmark uses torch's Adam.
DEEPSPEED := deepspeed==0.19.8
deepspeed: venv
	DS_BUILD_OPS=0 $(PY) -m pip install -q --disable-pip-version-check --no-build-isolation $(DEEPSPEED)

bench: venv
	$(PY) benchmarks/data_parallel.py

clean:
	rm -rf $(VENV) runs build *.egg-info
