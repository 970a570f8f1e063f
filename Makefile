# The two set-up commands of the README: `make compare` (the main job) and `make test` (the test suite).
# Both create .venv on first use with the pinned versions of constraints.txt.
PY ?= python3
VENV ?= .venv
EXTRAS ?= all,test
STAMP = $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
comma := ,

.PHONY: compare test install report sweep gpu clean-venv

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

compare: $(STAMP)
	$(VENV)/bin/harness compare --model mnist_mlp $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(ARGS)

report: $(STAMP)
	$(VENV)/bin/harness report

# Cost versus work on this machine's CPU: results/sweep-mnist_mlp.md and its plots (about 5 minutes on 2 cores).
sweep: $(STAMP)
	$(VENV)/bin/harness sweep --model mnist_mlp --widths $(SWEEP_WIDTHS) $(ARGS)

# Every GPU row in one command, on a machine with an NVIDIA GPU: torch eager and CUDA graphs, JAX jit and lax.scan,
# CuPy, Keras on JAX and on torch (the MNIST MLP and CNN, float32), then the same sweep on CUDA.  On a machine whose
# frameworks are installed already (no .venv): make gpu HARNESS="python3 -m harness".  `harness report` then merges
# the GPU rows into results/<model>.md and writes results/sweep-mnist_mlp-cuda.md.
HARNESS ?= $(VENV)/bin/harness
GPU_BACKENDS ?= torch,jax,cupy,keras-jax,keras-torch
SWEEP_WIDTHS ?= 16,32,64,128,256,512,1024,2048
gpu:
	$(HARNESS) list
	$(HARNESS) compare --model mnist_mlp --device cuda --backends $(GPU_BACKENDS) $(ARGS)
	$(HARNESS) compare --model mnist_mlp --device cuda --fast --backends torch,jax $(ARGS)
	$(HARNESS) compare --model mnist_cnn --device cuda --backends $(GPU_BACKENDS) $(ARGS)
	$(HARNESS) compare --model mnist_cnn --device cuda --fast --backends torch,jax $(ARGS)
	$(HARNESS) sweep --model mnist_mlp --device cuda --backends $(GPU_BACKENDS) --widths $(SWEEP_WIDTHS) $(ARGS)
	$(HARNESS) sweep --model mnist_mlp --device cuda --fast --backends torch,jax --widths $(SWEEP_WIDTHS) $(ARGS)
	$(HARNESS) report

clean-venv:
	rm -rf $(VENV)
