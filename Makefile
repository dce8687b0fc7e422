# mmloom: `make demo` runs the main job end to end, `make test` runs the tests,
# `make test-clients` checks exports in the real consumers (original LLaVA code, transformers 4.x, llama.cpp),
# `make test-lowest` runs the tests at the lowest declared dependency versions.
PYTHON ?= python3
VENV ?= .venv
# GPU users: make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmloom-installed

.PHONY: install test test-clients test-lowest demo demo-audio demo-video lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first (pinned: an unpinned torch pulls GBs of CUDA wheels), then the tested set (constraints.txt).
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) -m pip install -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

# Real consumers in their own cached environments under .venv-clients/ (see .ci/clients.sh)
test-clients: $(STAMP)
	.ci/clients.sh

test-lowest: $(STAMP)
	.ci/lowest.sh

demo: $(STAMP)
	$(VENV)/bin/mmloom demo --out runs/demo

demo-audio: $(STAMP)
	$(VENV)/bin/mmloom demo --modality audio --out runs/demo-audio

demo-video: $(STAMP)
	$(VENV)/bin/mmloom demo --modality video --out runs/demo-video

lint: $(STAMP)
	$(PY) -m ruff check src tests

clean:
	rm -rf runs .pytest_cache build *.egg-info src/*.egg-info
