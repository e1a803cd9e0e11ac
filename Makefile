# saetune: the two commands a newcomer types on a fresh clone.
#   make demo   — create .venv if missing, then run `saetune demo`
#   make test   — create .venv if missing, then run the test suite
# On a machine without an NVIDIA GPU the set-up installs a CPU build of torch first, so pip
# never pulls a multi-GB CUDA build.

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0
ARGS ?=

.PHONY: demo test venv bench chromium

VERL_NO_DEPS := verl==0.9.1 ray==2.60.0 tensordict==0.10.0 omegaconf==2.3.0 hydra-core==1.3.2 \
	antlr4-python3-runtime==4.9.3 codetiming==1.4.0 msgpack==1.2.4 pyvers==0.2.3 orjson==3.13.0 torchdata==0.11.0
VERL_WITH_DEPS := aiohttp==3.14.5 fastapi==0.165.0 cachetools==8.0.2
DEEPSPEED := deepspeed==0.19.8

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing the default (CUDA) torch"; \
	else \
		extra=""; \
		if $(PY) -c "import socket; socket.create_connection(('download.pytorch.org', 443), 3)" 2>/dev/null; then \
			extra="--extra-index-url https://download.pytorch.org/whl/cpu"; fi; \
		$(PY) -m pip install -q "$(TORCH_CPU)" $$extra; \
	fi
	# [trl]: the tests run real TRL GRPOTrainer steps with saetune's rewards ([dev] itself pulls no engine)
	$(PY) -m pip install -q -e ".[dev,trl]"
	# verl: its tests exercise saetune's registered pieces through verl's own code on CPU. verl pins
	# transformers<5.11, so verl and the modules its imports need go in without its dependency tree.
	$(PY) -m pip install -q --no-deps $(VERL_NO_DEPS)
	$(PY) -m pip install -q $(VERL_WITH_DEPS)
	# DeepSpeed for the ZeRO-2 tune test (CPU over gloo): no ops built now; its one JIT op (shm comm) is
	# compiled on the first multi-process run and cached by torch (about 1.5 minutes, once per machine).
	DS_BUILD_OPS=0 $(PY) -m pip install -q $(DEEPSPEED)
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/saetune demo $(ARGS)

# The explorer's browser test drives Debian's chromium through Playwright; install it when missing.
chromium:
	@test -x /usr/bin/chromium || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }

test: $(VENV)/.installed chromium
	TRITON_INTERPRET=1 SPARSIFY_DISABLE_TRITON=1 $(PY) -m pytest -q -p no:cacheprovider $(ARGS)

bench: $(VENV)/.installed
	$(PY) bench/cpu_sae_step.py
	$(PY) bench/capture_overhead.py
