#!/usr/bin/env bash
# A Python for Triton's Python-backend stub on a host whose Python has numpy 2 (the stub in
# nvidia-pytriton was built against numpy 1.x and garbles every input array under numpy 2).
#
#   scripts/stub_python.sh HOST_PYTHON OUT_DIR NUMPY_TAR_XZ [PATH...]
#
# Makes OUT_DIR a venv of HOST_PYTHON's interpreter holding numpy 1.x (unpacked from
# NUMPY_TAR_XZ), followed on sys.path by each PATH and HOST_PYTHON's own site-packages (torch,
# transformers). Put OUT_DIR/bin first on tritonserver's PATH: the stub's embedded interpreter
# takes its prefix, and so its site-packages, from the `python3` it finds there; it ignores
# PYTHONPATH.
#
# Those folders join as link farms without numpy, scipy and scikit-learn: packages built for the
# host's numpy 2 that break under numpy 1.x and that the stub never needs. transformers imports
# scikit-learn wherever it finds it (generation/candidate_generator.py), which imports scipy; a
# numpy-2-only scipy then fails ("module 'numpy' has no attribute 'long'") and with it
# `from transformers import AutoTokenizer` (seen on a GPU host: transformers 5.17, numpy 2.5).
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,12p' "$0" >&2; exit 2; }
PY=$1 OUT=$2 NUMPY=$3
shift 3
purelib() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
HIDDEN='^(numpy|scipy|sklearn|scikit_learn)([-_.].*)?$'  # packages, their dist-info and .libs
# farm SRC DST: DST links to every entry of SRC but the hidden ones
farm() {
  mkdir -p "$2"
  local entry name
  for entry in "$1"/* "$1"/.[!.]*; do
    [ -e "$entry" ] || continue
    name="$(basename "$entry")"
    [[ "$name" =~ $HIDDEN ]] || ln -s "$entry" "$2/$name"
  done
}
"$PY" -m venv --without-pip --clear "$OUT"
SITE="$(purelib "$OUT/bin/python")"
tar -C "$SITE" -xJf "$NUMPY"
# addsitedir, not a plain path line: the .pth files in those folders (editable installs) apply too
n=0
for dir in "$@" "$(purelib "$PY")"; do
  n=$((n + 1))
  farm "$dir" "$OUT/host-site-$n"
  printf 'import site; site.addsitedir(%s)\n' "$("$PY" -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$OUT/host-site-$n")"
done > "$SITE/minisgl_host_site.pth"
"$OUT/bin/python" -c 'import numpy, sys; sys.exit(f"stub_python: numpy {numpy.__version__} from {numpy.__file__}" if int(numpy.__version__.split(".")[0]) >= 2 else 0)'
echo "stub_python: $OUT/bin/python3 (numpy $("$OUT/bin/python" -c 'import numpy; print(numpy.__version__)'))"
