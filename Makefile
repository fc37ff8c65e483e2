# Two commands: `make demo` and `make test`. Both create .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install browser clean bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch/torchvision first and pinned: this pair is on the machine's disk; other versions are multi-GB downloads.
# `.[train,dev,notebook]`: the base install is the slim ONNX runtime (docs/deploy.md); training, tests, the demo
# and the notebook (examples/lesson2.ipynb, docs/notebook.md) need the rest.
# constraints.txt pins the other packages whose arithmetic makes a model: the same weights in every checkout.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -c constraints.txt -e '.[train,dev,notebook]' torch==2.14.1 torchvision==0.29.1
	touch $(STAMP)

install: $(STAMP)

# Browser tests drive Debian's chromium; never `playwright install`. Installed with apt-get as root
# (or through sudo without a password); `apt-get update` only when the first install fails (a stale
# or empty package index). A test that cannot run fails `make test`, so no chromium is an error here.
APT ?= env DEBIAN_FRONTEND=noninteractive apt-get -y -qq -o Dpkg::Use-Pty=0
CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" = "0" ]; then sudo=""; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	  else echo "make: $(CHROMIUM) is missing and this is not root: install it (sudo apt-get install chromium), or run .venv/bin/python -m pytest --allow-skips" >&2; exit 1; fi; \
	  echo "installing Debian chromium for the browser tests"; \
	  $$sudo $(APT) install chromium >/dev/null 2>&1 || { $$sudo $(APT) update && $$sudo $(APT) install chromium >/dev/null; } \
	    || { echo "make: could not install chromium with apt-get (see above); the browser tests cannot run" >&2; exit 1; }; \
	fi

demo: $(STAMP)
	$(BIN)/python -m ursa.demo

# Fails when a test skips for any reason but a missing GPU (tests/skip_check.py); every test has a
# time limit (pyproject.toml); the 15 slowest are listed at the end.
test: $(STAMP) browser
	$(BIN)/python -m pytest -q --durations=15

bench: $(STAMP)
	$(BIN)/python benchmarks/train.py

clean:
	rm -rf runs/demo .pytest_cache
