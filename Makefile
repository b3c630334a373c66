# maskpro_ds developer targets. `make help` lists them.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
# CPU torch first and pinned, so nothing resolves a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
STAMP   := $(VENV)/.installed

.PHONY: help install demo test test-cluster test-slow test-all lint bench gpu-check clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | sort

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q $(TORCH_PIN) -e '.[mpi,demo,test]'
	# Build DeepSpeed's CPU shared-memory comm op once, single-process, into the per-checkout cache
	# the tests use: several ranks JIT-building it at once can race, and it takes ~50 s.
	OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu TORCH_EXTENSIONS_DIR=$(CURDIR)/.cache/torch_extensions \
	  $(PYTHON) -c "from deepspeed.accelerator import get_accelerator; get_accelerator().create_op_builder('ShareMemCommBuilder').load()"
	touch $(STAMP)

install: $(STAMP)  ## create .venv with CPU torch and every dependency

demo: $(STAMP)  ## the main job end to end: SmolLM2 + Wikipedia offline, priors, MaskPro on 2 ZeRO-3 ranks, export, eval table
	$(BIN)/maskpro-demo

lint: $(STAMP)  ## ruff over the package, launchers, tools, bench and tests
	$(BIN)/ruff check maskpro_ds launchers tools bench tests

test: $(STAMP) lint  ## unit + distributed tests (not slow), ~12 min on 2 cores
	$(BIN)/pytest -m "not slow" -q

test-cluster: $(STAMP)  ## only tests/cluster: real sshd/pdsh and SLURM launches (root + Debian packages), preemption
	$(BIN)/pytest tests/cluster -q

test-slow: $(STAMP)  ## the slow checks (70B-shaped shapes, long runs)
	$(BIN)/pytest -m slow -q

test-all: $(STAMP) lint  ## everything
	$(BIN)/pytest -q

bench: $(STAMP)  ## the quick bench scripts (sampler, step_vs_forward, memory, export); figures go to bench/results/*.json
	for f in sampler step_vs_forward memory export; do $(PYTHON) -m bench.$$f || exit 1; done
	@echo "longer: $(PYTHON) -m bench.seventy_b_shaped (70B-shaped layer, ~10 GB RAM); $(PYTHON) -m bench.quality (~2.2 h)"

gpu-check: $(STAMP)  ## on a CUDA machine, <10 min: kernel probe, CPU/GPU masks, ZeRO-3 NCCL run, 2:4 Linear speed; bench/results/gpu_check.json
	$(BIN)/maskpro-gpu-check

clean:  ## remove caches (keeps .venv)
	rm -rf .pytest_cache build *.egg-info
