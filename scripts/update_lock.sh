#!/usr/bin/env bash
# Move the locks (locks/dev.txt for .venv, locks/server.txt for .server-venv) to the newest releases the registry
# serves, and write them only if the README's test command passes on them:
#   1. resolve locks/dev.in (pyproject's ranges + the setup extras, torch and triton kept) and locks/server.in
#      into a scratch folder, every package with its hashes;
#   2. install them into .venv and .server-venv (scripts/setup.sh's path, from those candidate files);
#   3. run the export of the demo model and the README's test command;
#   4. pass: the candidates replace locks/*.txt (commit them); fail: .venv and .server-venv go back to the old
#      locks and the candidates stay in the scratch folder for a look. Exit 0 / 1.
# Run it when a dependency has released (monthly, or when an issue names a release), before a submission.
#   --check        steps 1-3 and restore, whatever the result: is the project fine on today's newest releases?
#   PYTEST_ARGS    extra arguments to pytest (default: none; for example "-x")
set -euo pipefail
cd "$(dirname "$0")/.."

check_only=0
[ "${1:-}" = --check ] && check_only=1
[ -x .venv/bin/uv ] || { echo "update_lock: run scripts/setup.sh first (it installs uv into .venv)" >&2; exit 2; }
uv() { .venv/bin/uv "$@"; }
scratch=$(mktemp -d "${TMPDIR:-/tmp}/mvt-lock.XXXXXX")
find_links=()
for dir in ${PIP_FIND_LINKS:-} $(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true); do
    [ -d "$dir" ] && find_links+=(--find-links "$dir")
done

echo "update_lock: resolving the newest releases into $scratch"
# --python-version 3.11: the lock is for the interpreter setup.sh requires. The header records this command.
uv pip compile --quiet --upgrade --generate-hashes --python-version 3.11 "${find_links[@]}" --no-header \
    pyproject.toml locks/dev.in --extra onnx --extra dev --extra tensorrt-rtx --extra serve --extra embed --extra kserve \
    -o "$scratch/dev.txt"
# The server's onnxruntime is the one .venv gets, so both sides load the same opsets.
ort=$(sed -n 's/^onnxruntime==\([^ ]*\).*/\1/p' "$scratch/dev.txt")
{ cat locks/server.in; echo "onnxruntime==$ort"; } \
    | uv pip compile --quiet --upgrade --generate-hashes --python-version 3.11 --no-header - -o "$scratch/server.txt"
# nvidia-pytriton without its dependencies (those serve PyTriton's own Python API, which we do not use).
uv pip compile --quiet --upgrade --generate-hashes --python-version 3.11 --no-header --no-deps locks/server-nodeps.in \
    -o "$scratch/server-nodeps.txt"
cat "$scratch/server-nodeps.txt" >> "$scratch/server.txt"

for f in dev server; do
    echo "update_lock: locks/$f.txt -> candidate:"
    diff <(grep -E '^[A-Za-z0-9]' "locks/$f.txt" | cut -d' ' -f1) <(grep -E '^[A-Za-z0-9]' "$scratch/$f.txt" | cut -d' ' -f1) \
        | sed -n 's/^[<>] /  &/p' || true
done

restore() {
    echo "update_lock: restoring .venv and .server-venv from locks/*.txt"
    MVT_LOCK=locks/dev.txt bash scripts/setup.sh >/dev/null
}
status=0
{
    MVT_LOCK="$scratch/dev.txt" MVT_SERVER_LOCK="$scratch/server.txt" bash scripts/setup.sh &&
    out=$(mktemp -d) && .venv/bin/python -m export.build_engine --out "$out/demo" &&
    # shellcheck disable=SC2086
    .venv/bin/python -m pytest ${PYTEST_ARGS:-}
} || status=$?

if [ "$check_only" = 1 ] || [ "$status" != 0 ]; then
    restore
    if [ "$status" != 0 ]; then
        echo "update_lock: FAILED on the newest releases (exit $status); locks unchanged, candidates in $scratch" >&2
        exit 1
    fi
    echo "update_lock: the newest releases pass (--check: locks unchanged; candidates in $scratch)"
    exit 0
fi
for f in dev server; do
    { echo "# Written by scripts/update_lock.sh on $(date -u +%F); install with scripts/setup.sh."; cat "$scratch/$f.txt"; } \
        > "locks/$f.txt.tmp" && mv "locks/$f.txt.tmp" "locks/$f.txt"
done
echo "update_lock: passed; locks/dev.txt and locks/server.txt rewritten (commit them)"
