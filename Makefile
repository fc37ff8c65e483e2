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
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[train,dev,notebook]' torch==2.14.1 torchvision==0.29.1
	touch $(STAMP)

install: $(STAMP)

# Browser tests drive Debian's chromium; never `playwright install`.
browser:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = "0" ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium missing and not root: browser tests will skip"; fi; \
	fi

demo: $(STAMP)
	$(BIN)/python -m ursa.demo

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/train.py

clean:
	rm -rf runs/demo .pytest_cache
