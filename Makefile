# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1

.PHONY: install demo test lint clean

install: $(STAMP)

# torch==2.13.0 first: that is the CPU wheel on this machine's disk. An unpinned torch would
# download a multi-GB CUDA build; with 2.13.0 present, the package's "torch>=2.4" installs nothing more.
$(STAMP): pyproject.toml
	@echo "tpinfer: creating $(VENV) and installing torch (CPU) and the package; first time only, a few minutes" >&2
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tpinfer generate --tensor-parallel-size 2 --max-new-tokens 48 --temperature 0.7 --top-p 0.9 --seed 0 \
		"The function returns" "A list is"

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
