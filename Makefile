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

$(VENV)/.installed: pyproject.toml
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
