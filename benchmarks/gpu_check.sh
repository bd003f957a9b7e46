#!/usr/bin/env bash
# The prepared GPU check, one device call of under 8 minutes: install the project, the CUDA
# tests, then the forward benchmark on the full-size random model; with STEPS=load, the
# serving load benchmark instead (a second call, if device time is left). From the repository
# root, through the device tool:
#
#     run(command="BENCH_COMMIT=<git rev-parse HEAD here> bash benchmarks/gpu_check.sh",
#         carry=[".whl"], timeout_s=540)
#
# (the copied tree there has no .git: BENCH_COMMIT names the commit in the results). Each step
# has its own timeout (install 90 s, tests 170 s, forward benchmark 200 s: at most ~7.8 min
# with the machine listing), and a step that fails or times out does not stop the next one.
# With $OUT set (the tool sets it), everything printed is also written to $OUT/log, and $OUT
# receives the benchmark's results JSON (also under benchmarks/results/, which does not come
# back by itself) and pytest's JUnit XML.
#
# The project is installed there (editable, no build isolation, nothing fetched): the package
# build (scikit-build-core -> CMake -> grpcio-tools' protoc) generates the gRPC stubs. The
# device image (see /work/.library/device/KINDS.md) has torch 2.11, triton, transformers,
# safetensors, tokenizers, numpy, psutil, pytest, aiohttp, prometheus-client, cmake, ninja,
# but lacks grpcio-tools, grpcio-health-checking, grpcio-reflection and
# googleapis-common-protos, and its grpcio, protobuf and scikit-build-core are not the
# versions pyproject.toml pins (the stubs grpcio-tools 1.85 writes refuse an older grpcio or
# protobuf at import). Carry all seven as wheels (about 11 MB), downloaded here into .whl/
# (/.whl/ is in .gitignore):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#         -d .whl grpcio==1.85.3 grpcio-tools==1.85.1 grpcio-health-checking==1.85.1 \
#         grpcio-reflection==1.85.1 googleapis-common-protos==1.76.0 protobuf==7.36.2 scikit-build-core==1.1.2
# They are installed with --no-deps into /tmp/site, first on PYTHONPATH. The image has no
# flash-attn: a wheel of it built for the image's torch (2.11, CUDA 13, Python 3.12) carried in
# .whl/ too adds our "flash-attn" attention backend and HF's flash_attention_2 to the benchmark
# (a wheel that does not import is harmless: the benchmark says why and runs without it).
#
# Environment: STEPS (default "install tests forward"; any of install, tests, forward, load),
# PYTHON (default python3), INSTALL_TIMEOUT (90 s), PYTEST_TIMEOUT (170 s), BENCH_TIMEOUT
# (200 s), BENCH_ARGS (extra arguments of benchmarks.forward; default --all-attention
# --latency-repeats 10), LOAD_TIMEOUT (420 s), LOAD_ARGS (extra arguments of benchmarks.load;
# default --duration 10), BENCH_DEVICE (cuda). A dry run of this script on a CPU machine, from
# a virtual environment that has scikit-build-core (and no carried wheels, which are for the
# device's Python 3.12):
#     WHEELS=none PYTHON=.venv/bin/python BENCH_DEVICE=cpu BENCH_ARGS=--quick LOAD_ARGS=--quick \
#         bash benchmarks/gpu_check.sh
# Exit status: 0 when every step passed, else the last failing step's status.
set -u -o pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
INSTALL_TIMEOUT=${INSTALL_TIMEOUT:-90}
PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-170}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-200}
BENCH_ARGS=${BENCH_ARGS:---all-attention --latency-repeats 10}
BENCH_DEVICE=${BENCH_DEVICE:-cuda}
STEPS=${STEPS:-install tests forward}
WHEELS=${WHEELS:-.whl}
LOAD_TIMEOUT=${LOAD_TIMEOUT:-420}
LOAD_ARGS=${LOAD_ARGS:---duration 10}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; LOG=$OUT/log; else LOG=$(mktemp /tmp/gpu_check.XXXXXX.log); fi
: > "$LOG"
status=0
started=$(date +%s)

say() { echo "=== $* ($(( $(date +%s) - started )) s)" | tee -a "$LOG"; }

# step NAME TIMEOUT_S COMMAND...: runs COMMAND under a timeout, output tee'd to the log.
step() {
    local name=$1 limit=$2; shift 2
    say "$name: $*"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        status=$rc
        say "$name: FAILED with status $rc$( [ "$rc" -eq 124 ] && echo " (timed out after $limit s)")"
    else
        say "$name: ok"
    fi
}

wants() { [[ " $STEPS " == *" $1 "* ]]; }

if [ "$WHEELS" != none ] && compgen -G "$WHEELS/*.whl" > /dev/null; then
    say "installing the carried wheels: $(ls "$WHEELS")"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
        2>&1 | tee -a "$LOG" && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
        || { status=1; say "wheel install FAILED: going on without them"; }
fi

if wants install; then
    # The package build runs protoc into rerank_server._proto; editable, so the tests and the
    # benchmarks run this tree's code.
    step "install the project" "$INSTALL_TIMEOUT" "$PY" -m pip install -q --no-deps --no-build-isolation \
        --no-index --no-cache-dir -e .
    step "stubs import" 30 "$PY" -c "import rerank_server._proto.rerank_pb2_grpc as g; print('stubs:', g.__file__)"
fi

say "machine"
{ command -v nvidia-smi > /dev/null && nvidia-smi || echo "nvidia-smi: not found"; } 2>&1 | tee -a "$LOG"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib, sys
import torch
print(f"python {sys.version.split()[0]} ({sys.executable}); torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
for name in ("triton", "transformers", "flash_attn", "safetensors", "tokenizers", "psutil", "numpy", "pytest",
             "grpc", "google.protobuf", "scikit_build_core"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as e:
        print(f"{name}: does not import ({e.__class__.__name__}: {e})")
from rerank_kernels import available_attention_backends
from rerank_kernels.attention import ATTENTION_BACKENDS, attention_unavailable_reason
device = "cuda" if torch.cuda.is_available() else "cpu"
print("our attention backends (fp16, best first):", available_attention_backends(device, torch.float16))
for name in ATTENTION_BACKENDS:
    reason = attention_unavailable_reason(name, device, torch.float16)
    if reason:
        print(f"  {name}: unavailable: {reason}")
EOF

# copy_result PATTERN: the results file the last step wrote (from its "wrote ..." line) into $OUT
copy_result() {
    local result
    result=$(sed -n "$1" "$LOG" | tail -n 1)
    if [ -n "$result" ] && [ -n "${OUT:-}" ]; then
        cp "$result" "$OUT/" && say "copied $result to \$OUT"
    fi
}

if wants tests; then
    junit=()
    [ -n "${OUT:-}" ] && junit=(--junitxml "$OUT/pytest.xml")
    step "GPU tests" "$PYTEST_TIMEOUT" "$PY" -m pytest tests/test_gpu.py tests/test_tuning_gpu.py -q -rs -p no:cacheprovider "${junit[@]}"
fi

if wants forward; then
    # Writes checkpoints/full-random-fp16 first if it is missing (~10 s: fp16, not fp32).
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
    step "forward benchmark" "$BENCH_TIMEOUT" "$PY" -m benchmarks.forward --device "$BENCH_DEVICE" $BENCH_ARGS
    copy_result 's/^wrote \(.*\.json\) (total .*/\1/p'
fi

if wants load; then
    # The server needs the gRPC stubs: STEPS="install load" when this is a fresh machine.
    # The full-size model in fp16 on the GPU; on a CPU dry run, the load benchmark's own default.
    load_model=()
    if [ "$BENCH_DEVICE" = cuda ]; then
        ckpt=checkpoints/full-random-fp16
        [ -f "$ckpt/model.safetensors" ] || step "full-size fp16 checkpoint" 120 \
            "$PY" -m rerank_server.checkpoint --size full --dtype float16 --out "$ckpt"
        load_model=(--checkpoint "$ckpt")
    fi
    # shellcheck disable=SC2086  # LOAD_ARGS is a list of arguments
    step "load benchmark" "$LOAD_TIMEOUT" "$PY" -m benchmarks.load --device "$BENCH_DEVICE" "${load_model[@]}" $LOAD_ARGS
    copy_result 's/^wrote \(.*\.json\) in .*/\1/p'
fi

say "done, status $status"
exit "$status"
