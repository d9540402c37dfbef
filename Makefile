# make demo : train the TokenRank-head ViT on the embedded default and write figures
# make test : the test suite (the command CI runs)
# Both create their own virtual environment (.venv) and install the Debian data package.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# jaxlib 0.10.2 on CPU fuses a matmul chain followed by a reduction into a slow kernel;
# this turns that fusion off (see docs/chains.md §8, numerics notes).
export XLA_FLAGS ?= --xla_cpu_experimental_ynn_fusion_type=

.PHONY: demo test lint bench bench-stream bench-gpu venv data clean

venv: $(STAMP)
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[all,dev]"
	touch $(STAMP)

data: $(FMNIST)
$(FMNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

test: $(STAMP) data
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: $(STAMP) data
	$(PY) -m experiments.demo

bench: $(STAMP)
	$(PY) -m experiments.bench_core

bench-stream: $(STAMP)
	$(PY) -m experiments.bench_stream

bench-gpu: $(STAMP)
	$(PY) -m experiments.bench_gpu

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
