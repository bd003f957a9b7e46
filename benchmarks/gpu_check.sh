#!/usr/bin/env bash
# The one prepared GPU check (issue 3): the CUDA tests, then the forward benchmark on the
# full-size random model. Device time is scarce (about 15 minutes per task, the machine's
# start included): this script is sized to finish in about 8 minutes on an H100 (each step
# has its own timeout), and is meant to be run once, from the repository root:
#
#     bash benchmarks/gpu_check.sh
#
# through the device tool: run(command="BENCH_COMMIT=<git rev-parse HEAD here> bash benchmarks/gpu_check.sh",
# timeout_s=600) (the copied tree there has no .git: BENCH_COMMIT names the commit in the results),
# plus carry=[".whl"] when wheels are carried (below). With $OUT set (the tool sets it),
# everything printed is also written to $OUT/log, and $OUT receives the benchmark's
# results JSON (also under benchmarks/results/, which does not come back by itself) and
# pytest's JUnit XML.
#
# Installs nothing, except wheels carried in .whl/ if there are any: the machine's image
# has torch, triton, transformers, safetensors, psutil, numpy and pytest, but not
# flash-attn. A flash-attn wheel built for the image's torch (2.11, CUDA 13, Python 3.12)
# adds our "flash-attn" attention backend and HF's flash_attention_2 to the benchmark. To
# carry one: here, in the repository root (/.whl/ is already in .gitignore),
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#         --implementation cp --platform manylinux_2_28_x86_64 -d .whl NAME==VERSION
# (see /work/.library/device/README.md), and pass carry=[".whl"]. A wheel that does not
# import is harmless: the benchmark says why and runs without it.
#
# Environment: PYTHON (default python3), PYTEST_TIMEOUT (180 s), BENCH_TIMEOUT (270 s),
# BENCH_ARGS (extra arguments of benchmarks.forward; default --all-attention), BENCH_DEVICE
# (cuda; a dry run of this script on a CPU machine: BENCH_DEVICE=cpu BENCH_ARGS=--quick).
# Exit status: 0 when every step passed, else the last failing step's status.
set -u -o pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
PYTEST_TIMEOUT=${PYTEST_TIMEOUT:-180}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-270}
BENCH_ARGS=${BENCH_ARGS:---all-attention}
BENCH_DEVICE=${BENCH_DEVICE:-cuda}
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

if compgen -G ".whl/*.whl" > /dev/null; then
    say "installing the carried wheels: $(ls .whl)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        2>&1 | tee -a "$LOG" && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
        || { status=1; say "wheel install FAILED: going on without them"; }
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
for name in ("triton", "transformers", "flash_attn", "safetensors", "psutil", "numpy", "pytest"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as e:
        print(f"{name}: does not import ({e.__class__.__name__}: {e})")
from kernels import available_attention_backends
from kernels.attention import ATTENTION_BACKENDS, attention_unavailable_reason
device = "cuda" if torch.cuda.is_available() else "cpu"
print("our attention backends (fp16, best first):", available_attention_backends(device, torch.float16))
for name in ATTENTION_BACKENDS:
    reason = attention_unavailable_reason(name, device, torch.float16)
    if reason:
        print(f"  {name}: unavailable: {reason}")
EOF

junit=()
[ -n "${OUT:-}" ] && junit=(--junitxml "$OUT/pytest.xml")
step "GPU tests" "$PYTEST_TIMEOUT" "$PY" -m pytest tests/test_gpu.py -q -rs -p no:cacheprovider "${junit[@]}"

# Writes checkpoints/full-random-fp16 first if it is missing (~10 s: fp16, not fp32).
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
step "forward benchmark" "$BENCH_TIMEOUT" "$PY" -m benchmarks.forward --device "$BENCH_DEVICE" $BENCH_ARGS
result=$(sed -n 's/^wrote \(.*\.json\) (total .*/\1/p' "$LOG" | tail -n 1)
if [ -n "$result" ] && [ -n "${OUT:-}" ]; then
    cp "$result" "$OUT/" && say "copied $result to \$OUT"
fi

say "done, status $status"
exit "$status"
