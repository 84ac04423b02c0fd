# The README's two commands: `make demo` (the main job on the embedded default)
# and `make test` (the test suite). Both create or refresh .venv themselves.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# Without a GPU we take the CPU build that lies on this machine's disk: an unpinned
# torch would pull a multi-GB CUDA build. With a GPU (or TORCH= on the command line)
# pyproject's range applies, so a torch already in the venv keeps working.
TORCH   ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || echo torch==2.13.0)
DEMO_ARGS ?=

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH) -e '.[segcompass,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/segcompass demo $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) runs
