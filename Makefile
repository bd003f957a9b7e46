# Two commands do all the set-up on a fresh machine:
#   make serve [MODEL=dir-or-hub-id] [ARGS="--http-port 8000 ..."]   starts the service
#   make test                                                          lints (make lint), then runs the tests
#   make test-fast                                                     the edit loop: -m "not slow"
# Both create .venv: torch first (TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU
# build on a machine without a local torch wheel), then this project editable with its test
# and bench extras and the client, whose builds (scikit-build-core -> CMake) generate the gRPC stubs.
# pyproject.toml declares ranges; constraints.txt pins the versions installed here (and in CI).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
MODEL ?= BAAI/bge-reranker-v2-m3
ARGS ?=
# what a rebuild depends on: the metadata, the proto and the CMake that compiles it
BUILD_INPUTS := pyproject.toml constraints.txt client/pyproject.toml CMakeLists.txt client/CMakeLists.txt \
	cmake/ProtoStubs.cmake cmake/relative_imports.cmake proto/rerank/v1/rerank.proto \
	kernels/rerank_kernels/csrc/int8_rows.c kernels/rerank_kernels/csrc/attention_bf16.c

.PHONY: serve lint test test-fast checkpoint bench clean

$(VENV)/.installed: $(BUILD_INPUTS)
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -c constraints.txt -e ".[test,bench]" -e ./client
	touch $@

serve: $(VENV)/.installed
	$(VENV)/bin/rerank-server --model "$(MODEL)" $(ARGS)

# ruff, configured in pyproject.toml ([tool.ruff]); `make test` (and so CI) runs it first
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: $(VENV)/.installed lint
	$(PY) -m pytest $(ARGS)

# the edit loop: everything but the tests marked slow (markers: pyproject.toml)
test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow" $(ARGS)

checkpoint: $(VENV)/.installed
	$(VENV)/bin/rerank-server checkpoint --size tiny --out checkpoints/tiny

bench: $(VENV)/.installed
	$(PY) -m benchmarks.forward $(ARGS)

clean:
	rm -rf build client/build
