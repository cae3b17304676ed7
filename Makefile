# Two commands do all the setup on a fresh machine: `make run` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
TAG ?= demo

# torch==2.13.0 first: it is the CPU wheel on our machines; an unpinned torch pulls a multi-GB CUDA build.
# fineweb (huggingface_hub): `ratchet init` on a GPU box downloads FineWeb shards. `make run` needs no more;
# `make install` and `make test` add the dev extra (pytest, and triton for the interpreter tests).
$(VENV)/.runtime: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[fineweb]'
	touch $@

$(VENV)/.installed: $(VENV)/.runtime
	$(VENV)/bin/pip install -q -e '.[dev,fineweb]'
	touch $@

install: $(VENV)/.installed

EXPERIMENTS ?= 3
PRESET ?=

# the main job on the embedded CPU default: ratchet.toml + offline stdlib data + environment check, then the
# research loop (catalog proposer without an API key) for a bounded demo; `git log ratchet/$(TAG)` afterwards.
# Without PRESET, `ratchet init` picks: cpu-test without a GPU (a first verdict within minutes), gpt2-research with
# GPUs, and keeps a ratchet.toml that exists. PRESET=NAME writes that preset's (`make run PRESET=cpu-tiny TAG=tiny`
# for the CPU model that learns, its first verdict 20-45 minutes in; a tag measured with other settings refuses).
run: $(VENV)/.runtime
	$(VENV)/bin/ratchet init $(if $(PRESET),--preset $(PRESET) --force)
	$(VENV)/bin/ratchet run --tag $(TAG) --max-experiments $(EXPERIMENTS)
	$(VENV)/bin/ratchet log --tag $(TAG)

test: $(VENV)/.installed
	$(PY) -m pytest -q

# heavy end-to-end cases (real training runs through the whole pipeline)
test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow

# the GPU path end to end on a GPU box (docs/verification.md); without a GPU it says so and fails at once, before
# any setup (it runs `make install` itself once it has found one)
gpu-check:
	@VENV=$(VENV) scripts/gpu-check

.PHONY: install run test test-slow gpu-check
