# Two commands do all the setup on a fresh machine: `make run` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
TAG ?= demo

# torch==2.13.0 first: it is the CPU wheel on our machines; an unpinned torch pulls a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# the main job on the embedded CPU default: prepare the offline stdlib data, train cpu-tiny
run: $(VENV)/.installed
	$(PY) -m nanomodel.prepare --dataset stdlib
	$(VENV)/bin/torchrun --standalone --nproc_per_node=1 -m nanomodel.train --config cpu-tiny

test: $(VENV)/.installed
	$(PY) -m pytest -q

# heavy end-to-end cases (real training runs through the whole pipeline)
test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

.PHONY: install run test test-slow
