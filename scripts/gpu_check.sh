#!/usr/bin/env bash
# The one command on a CUDA host (Python 3.12 with torch + transformers, no package index), run
# from inside the folder `make gpu-bundle` built:
#
#   bash gpu-check.sh [RESULTS_DIR]          (default: ./results)
#   MINISGL_GPU_STAGES="gpu_tests serving" MINISGL_GPU_TESTS=fused bash gpu-check.sh   (a subset)
#
# Installs the bundled wheels and flashinfer into a scratch site dir, unpacks tritonserver, then
# runs the gpu tests and every GPU benchmark, one process each, within a total of 8 minutes
# (each stage gets what is left of the budget, capped by its own limit). Everything lands in
# RESULTS_DIR: gpu_tests.log, decode_step.json, decode_step_triton.json (Triton decode attention),
# engine.json, engine_triton.json, engine_fp8kv.json and decode_step_fp8kv.json (an fp8 KV cache),
# engine_normal.json, graph_launch.json, speculative.json (n-gram speculative decoding), lora.json,
# scheduler_cpu.json, hf.json, serving.json, summary.json (one line per stage: rc, seconds),
# report.json (benchmarks/gpu_report.py: every target next to what was measured),
# traces/ (chrome traces of the profiled decode steps), and
# each stage's stderr log.
set -u
G="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
R="$(mkdir -p "${1:-$G/results}" && cd "${1:-$G/results}" && pwd)"
SITE="${MINISGL_GPU_SITE:-/tmp/minisgl-gpu-site}"
MODEL="${MINISGL_GPU_MODEL:-/tmp/minisgl-qwen3-0.6b-random}"
BUDGET_S="${MINISGL_GPU_BUDGET_S:-470}"
PY="${PYTHON:-python3}"
STAGES="${MINISGL_GPU_STAGES:-}"     # e.g. "gpu_tests serving": run only these stages
TESTS="${MINISGL_GPU_TESTS:-}"       # a pytest -k expression for the gpu_tests stage
T0=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MAX_JOBS="${MAX_JOBS:-16}"
# the CUDA JIT norm kernels (the CuTe-DSL ones need nvidia-cutlass-dsl, which is not bundled)
export FLASHINFER_USE_CUDA_NORM=1

left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
summary() { echo "{\"stage\": \"$1\", \"rc\": $2, \"seconds\": $3}" >> "$R/summary.json"; }
# stage NAME LIMIT_S OUTFILE CMD...: run with min(LIMIT_S, what is left), stdout -> OUTFILE
stage() {
  local name=$1 limit=$2 out=$3; shift 3
  if [ -n "$STAGES" ] && [[ " $STAGES " != *" $name "* ]]; then
    echo "=== $name not selected"; summary "$name" '"not selected"' 0; return
  fi
  local budget; budget=$(left)
  [ "$budget" -lt "$limit" ] && limit=$budget
  if [ "$limit" -lt 15 ]; then
    echo "=== $name skipped: the 8-minute budget is spent"; summary "$name" '"skipped"' 0; return
  fi
  echo "=== $name (limit ${limit}s, at +$(( $(date +%s) - T0 ))s)"
  local s; s=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$out" 2> "$R/$name.stderr.log"
  local rc=$?
  summary "$name" "$rc" $(( $(date +%s) - s ))
  tail -c 2000 "$out"; echo
  [ "$rc" -eq 0 ] || { echo "--- $name failed (rc $rc), stderr tail:"; tail -20 "$R/$name.stderr.log"; }
}

: > "$R/summary.json"
echo "=== setup: wheels + flashinfer into $SITE, tritonserver into $G/triton"
rm -rf "$SITE" && mkdir -p "$SITE"
"$PY" -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" "$G"/whl/*.whl || exit 1
tar -C "$SITE" -xJf "$G/flashinfer.tar.xz" || exit 1
rm -rf "$G/triton" && tar -C "$G" -xJf "$G/triton.tar.xz" || exit 1
export PYTHONPATH="$G/proj:$SITE${PYTHONPATH:+:$PYTHONPATH}"
read -r ARCH LIBPY PURELIB < <("$PY" - <<'PYEOF'
import sysconfig, torch
major, minor = torch.cuda.get_device_capability()
print(f"{major}.{minor}" + ("a" if major >= 9 else ""), sysconfig.get_config_var("LIBDIR"),
      sysconfig.get_paths()["purelib"])
PYEOF
)
export FLASHINFER_CUDA_ARCH_LIST="${FLASHINFER_CUDA_ARCH_LIST:-$ARCH}"
# the stub takes its site-packages from the python3 first on PATH and needs numpy<2 there
STUB_BIN="$(dirname "$(command -v "$PY")")"
if ! "$PY" -c 'import sys, numpy; sys.exit(int(numpy.__version__.split(".")[0]) >= 2)'; then
  "$G/proj/scripts/stub_python.sh" "$PY" /tmp/minisgl-stub-python "$G/stub-numpy.tar.xz" "$G/proj" "$SITE" || exit 1
  STUB_BIN=/tmp/minisgl-stub-python/bin
fi
cat > "$G/triton/env.sh" <<ENVEOF
export MINISGL_TRITON_HOME="$G/triton"
export LD_LIBRARY_PATH="$G/triton/lib:$LIBPY\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export PYTHONPATH="$PYTHONPATH:$PURELIB"
export MINISGL_PYTHONPATH="$PYTHONPATH:$PURELIB"
export PATH="$STUB_BIN:\$PATH"
ENVEOF
export MINISGL_TRITON_HOME="$G/triton"
nvidia-smi -L
"$PY" -c "import torch, transformers, flashinfer; print('torch', torch.__version__, 'transformers', transformers.__version__, 'flashinfer', flashinfer.__version__, 'arch', '$FLASHINFER_CUDA_ARCH_LIST')" || exit 1
cd "$G/proj"

# up to 400 s: the flashinfer JIT builds of a fresh host and the fp8 variants (last in the file);
# with a 15-minute device budget, run the measurements and this stage in two calls
stage gpu_tests 400 "$R/gpu_tests.log" \
  "$PY" -m pytest -m gpu tests/test_gpu.py -v -p no:cacheprovider -o addopts="" ${TESTS:+-k "$TESTS"}
stage build 60 "$R/build.json" "$PY" benchmarks/gpu_drive.py build "$MODEL"
stage decode_step 120 "$R/decode_step.json" \
  "$PY" benchmarks/decode_step.py --model "$MODEL" --device cuda --dtype bfloat16 --trace-dir "$R/traces" --host-profile
# the A/B of the decode attention kernel: Triton (no host plan per step) against flashinfer's
stage decode_step_triton 60 "$R/decode_step_triton.json" "$PY" benchmarks/decode_step.py --model "$MODEL" \
  --device cuda --dtype bfloat16 --batch-sizes 1 64 256 --settings decode_attention=triton
# what cudaGraphLaunch costs the host per node, by node kind and with a memcpy node or a fork in
# the graph (the largest item of a step's host time; decode_step.json's graph_census says what
# the decode graph holds)
stage graph_launch 60 "$R/graph_launch.json" "$PY" benchmarks/graph_launch.py
stage engine 75 "$R/engine.json" "$PY" benchmarks/gpu_drive.py engine "$MODEL"
if ls "$LIBPY"/libpython3.12.so* > /dev/null 2>&1; then
  stage serving 180 "$R/serving.json" "$PY" benchmarks/triton_latency.py --model "$MODEL" \
    --concurrency 1 16 64 256 --output-len 64 --settings device=cuda dtype=bfloat16
else
  echo "=== serving skipped: $LIBPY has no libpython3.12.so (the Python backend stub links it)"
  summary serving '"no libpython3.12.so"' 0
fi
# the offline run with the Triton decode attention
stage engine_triton 75 "$R/engine_triton.json" "$PY" benchmarks/gpu_drive.py engine "$MODEL" \
  --settings decode_attention=triton
# the offline run with an fp8 KV cache (half the K/V bytes: the workload is bound by reading them;
# its flashinfer decode variant, bf16 q over e4m3 K/V at 2 query heads per KV head, builds here)
stage engine_fp8kv 150 "$R/engine_fp8kv.json" "$PY" benchmarks/gpu_drive.py engine "$MODEL" \
  --settings kv_cache_dtype=fp8
# the decode step with an fp8 KV cache where K/V dominate the bytes (bs 64 and 256)
stage decode_step_fp8kv 90 "$R/decode_step_fp8kv.json" "$PY" benchmarks/decode_step.py --model "$MODEL" \
  --device cuda --dtype bfloat16 --batch-sizes 64 256 --settings kv_cache_dtype=fp8
# after serving: the HF baseline is the one stage that a later run can reuse
stage hf 70 "$R/hf.json" "$PY" benchmarks/gpu_drive.py hf "$MODEL" --max-new 256
stage engine_normal 60 "$R/engine_normal.json" "$PY" benchmarks/gpu_drive.py engine "$MODEL" --no-overlap
# speculative decoding (n-gram drafts, verify steps in CUDA graphs) against plain decoding on a
# random model whose outputs loop, 1 / 4 / 16 / 64 streams in-process
stage speculative 90 "$R/speculative.json" "$PY" benchmarks/speculative.py --workloads loop \
  --streams 1 4 16 64 --triton-streams --settings device=cuda dtype=bfloat16
# LoRA: one batch over 1 / 4 / 16 adapters against the base model alone (rank 16, every projection)
stage lora 90 "$R/lora.json" "$PY" benchmarks/lora.py --model "$MODEL" --requests 256 --max-tokens 128 \
  --settings device=cuda dtype=bfloat16
stage scheduler_cpu 60 "$R/scheduler_cpu.json" "$PY" benchmarks/gpu_drive.py scheduler_cpu "$MODEL"
echo "=== done at +$(( $(date +%s) - T0 ))s; results in $R"
cat "$R/summary.json"
# the targets of the GPU issue next to what this run measured
"$PY" benchmarks/gpu_report.py "$R" > "$R/report.json" && cat "$R/report.json"
