#!/usr/bin/env bash
# Build a folder for a CUDA host whose Python (3.12) already has torch + transformers but which
# has no package index: `make gpu-bundle` -> build/gpu-bundle (<= 60 MB), then on that host
# `bash gpu-check.sh` inside it (see scripts/gpu_check.sh).
#
#   scripts/gpu_bundle.sh [OUT_DIR] [PYTHON_WITH_PYTRITON]
#
# Contents:
#   proj/            the committed project (git archive HEAD: commit first)
#   whl/             CPython 3.12 manylinux wheels: apache-tvm-ffi, nvidia-ml-py (flashinfer imports
#                    pynvml), pyzmq, msgspec (engine) and
#                    tritonclient[grpc] + grpcio + protobuf + python-rapidjson (serving benchmark)
#   flashinfer.tar.xz  flashinfer-python 0.7.2.post1 minus kernel sources the engine never builds
#                    (MoE, MLA, fp4/fp8 GEMMs, sm100/sm110/sm120 variants, experimental kernels)
#   triton.tar.xz    tritonserver from the nvidia-pytriton wheel: the binary, the shared libraries
#                    it and the Python backend load (found with readelf), the Python backend with
#                    its stub for Python 3.12, the local response cache
#   stub-numpy.tar.xz  numpy 1.26.4 for CPython 3.12 (tests stripped): the Python-backend stub
#                    needs numpy<2, and a host Python may have numpy 2 (scripts/stub_python.sh)
#   gpu-check.sh     the one command to run there
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/build/gpu-bundle}"
PY="${2:-$ROOT/.venv/bin/python}"
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"  # absolute: the script changes directory
LIMIT_MB=60
FLASHINFER=flashinfer-python==0.7.2.post1
ENGINE_WHEELS="apache-tvm-ffi==0.1.15.post2 nvidia-ml-py==13.615.71 pyzmq==27.3.0 msgspec==0.22.0"
STUB_NUMPY=numpy==1.26.4
CLIENT_WHEELS="tritonclient==2.73.0 grpcio==1.85.3 protobuf==6.33.6 python-rapidjson==1.25"

SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
DIST="$SITE/pytriton/tritonserver"
LIBS="$SITE/nvidia_pytriton.libs"
[ -x "$DIST/bin/tritonserver" ] || { echo "gpu_bundle: no tritonserver in $DIST (nvidia-pytriton in $PY's env?)" >&2; exit 1; }

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
rm -rf "$OUT"
mkdir -p "$OUT/whl" "$OUT/proj" "$TMP/dl"

echo "gpu_bundle: wheels for CPython 3.12 manylinux x86_64"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$TMP/dl" $FLASHINFER $ENGINE_WHEELS $CLIENT_WHEELS
mv "$TMP"/dl/*.whl "$OUT/whl/"
mv "$OUT"/whl/flashinfer_python-*.whl "$TMP/"

echo "gpu_bundle: flashinfer trimmed to the fa2 paged attention, norm, rope and activation JIT sources"
mkdir "$TMP/fi" && (cd "$TMP/fi" && "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall('.')" "$TMP"/flashinfer_python-*.whl)
CSRC="$TMP/fi/flashinfer/data/csrc"
for d in alphamoe_router bgmv_moe blackwell_bf16_fp4 blackwell_msa 'cake_*' concat_mla cute_sm12x_gemm experimental \
         fmha_v2 fused_moe gated_act_mxfp8 gdn kda mhc nv_internal nvfp4_attention_sm120 sparse_mla_sm120 xqa; do
  rm -rf "$CSRC"/$d
done
rm -f "$CSRC"/cake_*.cu "$CSRC"/alphamoe_*.cu "$CSRC"/*moe*.cu "$CSRC"/*sm100*.cu "$CSRC"/*sm110*.cu \
      "$CSRC"/*sm120*.cu "$CSRC"/*blackwell*.cu
rm -rf "$TMP"/fi/flashinfer/experimental/*/kernel_src "$TMP/fi/flashinfer/moe_ep/kernel_src"
# the JIT include paths are cutlass/{include,tools/util/include} and cccl/{cub,libcudacxx/include,thrust}
DATA="$TMP/fi/flashinfer/data"
rm -rf "$DATA"/cutlass/{examples,python,test,docs,media} "$DATA"/cccl/{python,docs,ci,cudax,c,examples}
for needed in norm.cu rope.cu page.cu batch_decode.cu batch_prefill.cu; do
  ls "$CSRC"/$needed >/dev/null 2>&1 || ls "$CSRC"/*/"$needed" >/dev/null 2>&1 || \
    echo "gpu_bundle: warning: $needed not in flashinfer's csrc (layout changed?)" >&2
done
# xz: the sources and headers compress about twice as well as in a zip
tar -C "$TMP/fi" -cf - . | xz -T2 -6 > "$OUT/flashinfer.tar.xz"  # with its dist-info

echo "gpu_bundle: numpy<2 for the Python-backend stub"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$TMP/np" $STUB_NUMPY
mkdir "$TMP/np/x" && (cd "$TMP/np/x" && "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall('.')" "$TMP"/np/numpy-*.whl)
rm -rf "$TMP"/np/x/numpy/tests "$TMP"/np/x/numpy/*/tests
tar -C "$TMP/np/x" -cf - . | xz -T2 -9 > "$OUT/stub-numpy.tar.xz"

echo "gpu_bundle: tritonserver + the libraries it loads, xz-compressed"
T="$TMP/triton"
mkdir -p "$T/bin" "$T/lib" "$T/backends/python"
cp "$DIST/bin/tritonserver" "$T/bin/"
cp "$DIST/backends/python/libtriton_python.so" "$DIST/backends/python/triton_python_backend_utils.py" "$T/backends/python/"
cp "$DIST/python_backend_stubs/3.12/triton_python_backend_stub" "$T/backends/python/"
cp -r "$DIST/caches" "$T/caches"
# the closure of NEEDED entries that the wheel bundles (system libraries stay the host's)
queue=("$T/bin/tritonserver" "$T/backends/python/libtriton_python.so" "$T/backends/python/triton_python_backend_stub"
       "$T"/caches/local/*.so)
while [ ${#queue[@]} -gt 0 ]; do
  f="${queue[0]}"; queue=("${queue[@]:1}")
  for lib in $(readelf -d "$f" | awk '/NEEDED/ {gsub(/[\[\]]/, "", $NF); print $NF}'); do
    if [ -f "$LIBS/$lib" ] && [ ! -f "$T/lib/$lib" ]; then
      cp "$LIBS/$lib" "$T/lib/"
      queue+=("$T/lib/$lib")
    fi
  done
done
tar -C "$TMP" -cf - triton | xz -T2 -9 > "$OUT/triton.tar.xz"

(cd "$ROOT" && git archive HEAD) | tar -x -C "$OUT/proj"
cp "$ROOT/scripts/gpu_check.sh" "$OUT/gpu-check.sh"
chmod +x "$OUT/gpu-check.sh"

size_mb=$(du -sm "$OUT" | cut -f1)
du -sh "$OUT"/* | sed 's/^/  /'
echo "gpu_bundle: $OUT is ${size_mb} MB (limit ${LIMIT_MB} MB); on the GPU host: bash gpu-check.sh"
[ "$size_mb" -le "$LIMIT_MB" ] || { echo "gpu_bundle: over ${LIMIT_MB} MB" >&2; exit 1; }
