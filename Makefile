# saetune: the two commands a newcomer types on a fresh clone.
#   make demo          — create .venv with what the demo needs (locked versions), then run `saetune demo`
#   make test          — add the test extras (TRL, verl, DeepSpeed, Chromium), then run the test suite
# and, for maintainers:
#   make test-latest   — the suite in .venv-latest, resolved to the newest releases (finds upstream drift)
#   make lock          — make test-latest, then write its versions to constraints.txt
# Installs use constraints.txt (pip constraints: every direct and transitive dependency at the
# versions the suite passed with). On a machine without
# an NVIDIA GPU the set-up installs a CPU build of torch first, so pip never pulls a multi-GB CUDA build.

VENV ?= .venv
PY := $(VENV)/bin/python
LATEST ?=
TORCH_CPU ?= torch==$(or $(shell sed -n 's/^torch==//p' constraints.txt 2>/dev/null),2.13.0)
# Locked: every install constrained by constraints.txt. LATEST=1: everything upgraded to the newest
# release except torch, which stays at the lock's version (a newer one would be a multi-GB CUDA build).
PIP_C := $(if $(LATEST),-U --upgrade-strategy eager "$(TORCH_CPU)",-c constraints.txt)
ARGS ?=

.PHONY: demo test venv venv-demo bench chromium test-latest lock

# verl pins transformers<5.11, so verl and the modules its imports need go in without its dependency
# tree, at these versions (in every mode, newest included: they are pinned, not resolved).
VERL_NO_DEPS := verl==0.9.1 ray==2.60.0 tensordict==0.10.0 omegaconf==2.3.0 hydra-core==1.3.2 \
	antlr4-python3-runtime==4.9.3 codetiming==1.4.0 msgpack==1.2.4 pyvers==0.2.3 orjson==3.13.0 torchdata==0.11.0
VERL_WITH_DEPS := aiohttp fastapi cachetools
DEEPSPEED := deepspeed

# What the demo needs: torch (CPU build without a GPU) and saetune with its own dependencies.
$(VENV)/.demo-installed: pyproject.toml Makefile constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "NVIDIA GPU found: installing the default (CUDA) torch"; \
	else \
		extra=""; \
		if $(PY) -c "import socket; socket.create_connection(('download.pytorch.org', 443), 3)" 2>/dev/null; then \
			extra="--extra-index-url https://download.pytorch.org/whl/cpu"; fi; \
		$(PY) -m pip install -q $(if $(LATEST),,-c constraints.txt) "$(TORCH_CPU)" $$extra; \
	fi
	$(PY) -m pip install -q $(PIP_C) -e .
	touch $@

# What the tests add. [trl]: real TRL GRPOTrainer steps with saetune's rewards ([dev] pulls no engine).
# verl: its tests exercise saetune's registered pieces through verl's own code on CPU.
# DeepSpeed for the ZeRO-2 tune test (CPU over gloo): no ops built now; its one JIT op (shm comm) is
# compiled on the first multi-process run and cached by torch (about 1.5 minutes, once per machine).
$(VENV)/.installed: $(VENV)/.demo-installed
	$(PY) -m pip install -q $(PIP_C) -e ".[dev,trl]"
	$(PY) -m pip install -q --no-deps $(VERL_NO_DEPS)
	$(PY) -m pip install -q $(PIP_C) $(VERL_WITH_DEPS)
	DS_BUILD_OPS=0 $(PY) -m pip install -q $(PIP_C) $(DEEPSPEED)
	touch $@

venv-demo: $(VENV)/.demo-installed
venv: $(VENV)/.installed

demo: $(VENV)/.demo-installed
	$(VENV)/bin/saetune demo $(ARGS)

# The explorer's browser test drives Debian's chromium through Playwright; install it when missing.
chromium:
	@test -x /usr/bin/chromium || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }

# Without an NVIDIA GPU the Triton kernels run in Triton's CPU interpreter; with one, the same command
# runs them compiled and tests/gpu runs too.
test: $(VENV)/.installed chromium
	if command -v nvidia-smi >/dev/null 2>&1; then cpu=""; \
	else cpu="TRITON_INTERPRET=1 SPARSIFY_DISABLE_TRITON=1"; fi; \
	env $$cpu $(PY) -m pytest -q -p no:cacheprovider $(ARGS)

# The suite against the newest releases, in a venv of its own (the locked .venv is left alone).
test-latest:
	rm -f .venv-latest/.demo-installed .venv-latest/.installed
	$(MAKE) test VENV=.venv-latest LATEST=1

# The lock is what the suite just passed with: local version labels (+cpu) dropped so a CUDA
# machine takes the same release. Upgrades done in several pip calls can leave an environment
# whose versions pip would never pick together (one package's pin broken by a later upgrade), so
# the new lock must resolve as a whole, as `make test` installs it, before it replaces the old one.
lock: test-latest
	{ echo "# saetune's lock: every direct and transitive dependency at the versions the whole test suite passed"; \
	  echo "# with (Python $$(.venv-latest/bin/python -c 'import platform; print(platform.python_version())'), $$(uname -s) $$(uname -m)). pip constraints: make demo / make test install with '-c constraints.txt'."; \
	  echo "# Regenerate with 'make lock' (which first runs 'make test-latest'); never edit by hand."; \
	  .venv-latest/bin/python -m pip freeze --exclude-editable | sed -E 's/\+[A-Za-z0-9.]+$$//'; } > constraints.txt.tmp
	.venv-latest/bin/python -m pip install --dry-run -q -c constraints.txt.tmp -e ".[dev,trl]" \
		$(VERL_WITH_DEPS) $(DEEPSPEED) "$(TORCH_CPU)" || { echo "make lock: these versions do not resolve" \
		"together (see pip's message above); constraints.txt is unchanged, the candidate is constraints.txt.tmp"; exit 1; }
	mv constraints.txt.tmp constraints.txt

bench: $(VENV)/.demo-installed
	$(PY) bench/cpu_sae_step.py
	$(PY) bench/capture_overhead.py
