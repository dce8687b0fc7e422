# mmloom: `make demo` runs the main job end to end, `make test` runs the tests.
PYTHON ?= python3
VENV ?= .venv
# GPU users: make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmloom-installed

.PHONY: install test demo demo-audio lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

demo: $(STAMP)
	$(VENV)/bin/mmloom demo --out runs/demo

demo-audio: $(STAMP)
	$(VENV)/bin/mmloom demo --modality audio --out runs/demo-audio

lint: $(STAMP)
	$(PY) -m ruff check src tests

clean:
	rm -rf runs .pytest_cache build *.egg-info src/*.egg-info
