# Two commands do all the set-up on a fresh machine:
#   make serve [MODEL=dir-or-hub-id] [ARGS="--http-port 8000 ..."]   starts the service
#   make test                                                          runs the tests
# Both create .venv (CPU torch first, then this project with its test extras) and
# generate the protobuf/gRPC stubs through CMake.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
MODEL ?= BAAI/bge-reranker-v2-m3
ARGS ?=

.PHONY: serve test proto checkpoint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

proto: $(VENV)/.installed
	cmake -S . -B build -DPython3_EXECUTABLE=$(abspath $(PY)) > /dev/null
	cmake --build build --target proto

serve: proto
	$(PY) -m server --model "$(MODEL)" $(ARGS)

test: proto
	$(PY) -m pytest $(ARGS)

checkpoint: $(VENV)/.installed
	$(PY) -m server.checkpoint --size tiny --out checkpoints/tiny

bench: proto
	$(PY) -m benchmarks.forward $(ARGS)

clean:
	rm -rf build server/gen
