#!/usr/bin/env bash
# Install a working perf_analyzer under build/perf_analyzer (never into the main venv).
#
# tritonclient[all] 2.73 ships no binary (its perf-analyzer dependency is an empty placeholder)
# and the perf-analyzer 2.60 wheel needs glibc 2.38. The tritonclient 2.41.0 wheel bundles a
# perf_analyzer that runs on Debian 12 once libb64.so.0d and libcudart.so.12 are on the library
# path: both come with nvidia-pytriton (nvidia_pytriton.libs), so nothing else is downloaded.
#
#   scripts/setup_perf_analyzer.sh [VENV_PYTHON] [OUT_DIR]   ->  OUT_DIR/perf_analyzer (wrapper)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${1:-$ROOT/.venv/bin/python}"
OUT="${2:-$ROOT/build/perf_analyzer}"
VERSION="${PERF_ANALYZER_TRITONCLIENT:-2.41.0}"
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
LIBS="$SITE/nvidia_pytriton.libs"

mkdir -p "$OUT/lib"
if [ ! -x "$OUT/pkgs/bin/perf_analyzer" ]; then
  rm -rf "$OUT/pkgs"
  "$PY" -m pip install --quiet --no-deps --target "$OUT/pkgs" "tritonclient==$VERSION"
fi
b64="$(ls "$LIBS"/libb64-*.so.0d 2>/dev/null | head -1 || true)"
cudart="$(ls "$LIBS"/libcudart-*.so.12* 2>/dev/null | head -1 || true)"
if [ -z "$b64" ] || [ -z "$cudart" ]; then
  echo "setup_perf_analyzer: libb64/libcudart not found in $LIBS (is nvidia-pytriton installed?)" >&2
  exit 1
fi
ln -sf "$b64" "$OUT/lib/libb64.so.0d"
ln -sf "$cudart" "$OUT/lib/libcudart.so.12"
cat > "$OUT/perf_analyzer" <<WRAP
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$OUT/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$OUT/pkgs/bin/perf_analyzer" "\$@"
WRAP
chmod +x "$OUT/perf_analyzer"
"$OUT/perf_analyzer" --version >/dev/null 2>&1 || "$OUT/perf_analyzer" --help >/dev/null 2>&1 || {
  echo "setup_perf_analyzer: $OUT/perf_analyzer does not run on this machine" >&2; exit 1; }
echo "setup_perf_analyzer: $("$OUT/perf_analyzer" --version 2>&1 | head -1) in $OUT/perf_analyzer"
