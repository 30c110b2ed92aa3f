#!/usr/bin/env bash
# Install Triton's own load generator, perf_analyzer, into the server environment (PyPI only):
#   <SERVER_ENV>/perf_analyzer/bin/perf_analyzer   from the tritonclient manylinux wheel's data files
#   <SERVER_ENV>/perf_analyzer/lib/                libb64.so.0d and libcudart.so.12 (it links them even on a
#                                                  CPU): symlinks to the copies nvidia-pytriton bundles
#   <SERVER_ENV>/perf_analyzer/wheels/             the downloaded wheel (a cache: reruns do not download)
# PyPI's `perf-analyzer` package is an empty placeholder; the binary ships inside tritonclient's wheel, which
# is only downloaded and unpacked here (.venv's tritonclient is left as it is).
# triton_repo/perf_analyzer.py finds the binary and runs it with lib/ on LD_LIBRARY_PATH.
# Called by scripts/setup_server_env.sh (after nvidia-pytriton is installed); idempotent.
#   SERVER_ENV                 the server environment (default: .server-venv)
#   PERF_ANALYZER_TRITONCLIENT the tritonclient wheel version to take it from (default: 2.51.0, = tritonserver)
set -euo pipefail
cd "$(dirname "$0")/.."

env_dir=${SERVER_ENV:-.server-venv}
version=${PERF_ANALYZER_TRITONCLIENT:-2.51.0}
dest=$env_dir/perf_analyzer
python=$env_dir/bin/python3
[ -x "$python" ] || { echo "setup_perf_analyzer: no $python; run scripts/setup_server_env.sh first" >&2; exit 1; }
[ "$(uname -m)" = x86_64 ] || { echo "setup_perf_analyzer: the tritonclient wheel ships perf_analyzer for x86_64 only" >&2; exit 1; }

mkdir -p "$dest/bin" "$dest/lib" "$dest/wheels"
wheel=$(ls "$dest/wheels"/tritonclient-"$version"-*manylinux*x86_64.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux1_x86_64 \
        --python-version 3 --implementation py -d "$dest/wheels" "tritonclient==$version"
    wheel=$(ls "$dest/wheels"/tritonclient-"$version"-*manylinux*x86_64.whl | head -n1)
fi

# The wheel is a zip; its data files hold the binary. Unpack to a temporary name, then rename (never half-written).
"$python" - "$wheel" "$dest/bin/perf_analyzer" <<'EOF'
import os, shutil, sys, zipfile
wheel, target = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.endswith(".data/data/bin/perf_analyzer")]
    if not names:
        sys.exit(f"setup_perf_analyzer: {wheel} has no *.data/data/bin/perf_analyzer")
    info = z.getinfo(names[0])
    if os.path.exists(target) and os.path.getsize(target) == info.file_size:
        sys.exit(0)
    tmp = target + ".partial"
    with z.open(info) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)
os.chmod(tmp, 0o755)
os.replace(tmp, target)
EOF

# libb64 and libcudart under the plain names the binary asks for (nvidia-pytriton bundles them under hashed names).
bundled=$("$python" -c 'import importlib.util, os; s = importlib.util.find_spec("pytriton"); print(os.path.join(os.path.dirname(s.submodule_search_locations[0]), "nvidia_pytriton.libs") if s else "")')
[ -d "$bundled" ] || { echo "setup_perf_analyzer: nvidia-pytriton is not installed in $env_dir (its libraries serve perf_analyzer); run scripts/setup_server_env.sh" >&2; exit 1; }
for lib in libb64.so.0d libcudart.so.12; do
    found=$(ls "$bundled"/"${lib%%.so*}"-*.so* 2>/dev/null | head -n1 || true)
    [ -n "$found" ] || { echo "setup_perf_analyzer: no ${lib%%.so*} in $bundled" >&2; exit 1; }
    ln -sfn "$(realpath "$found")" "$dest/lib/$lib"
done

if LD_LIBRARY_PATH="$dest/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ldd "$dest/bin/perf_analyzer" | grep -q "not found"; then
    echo "setup_perf_analyzer: $dest/bin/perf_analyzer has unresolved libraries:" >&2
    LD_LIBRARY_PATH="$dest/lib" ldd "$dest/bin/perf_analyzer" | grep "not found" >&2
    exit 1
fi
LD_LIBRARY_PATH="$dest/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$dest/bin/perf_analyzer" --version >/dev/null 2>&1 || {
    echo "setup_perf_analyzer: $dest/bin/perf_analyzer --version failed" >&2; exit 1; }
echo "setup: perf_analyzer (tritonclient $version wheel) at $dest/bin/perf_analyzer"
