#!/usr/bin/env bash
# Dependency checks of pyproject.toml, in a throwaway venv that has only the CPU build of torch
# (the Makefile's TORCH pin). Nothing is installed: pip resolves with --dry-run, reading only metadata.
#   1. A plain CPU install (no extras) would not pull triton (about 1 GB; it is the `interpret` extra),
#      nor replace the CPU torch (a CUDA torch would bring triton and the nvidia-* wheels).
#   2. The declared lower bounds install together: every direct dependency of the project and of
#      its extras pinned to its lower bound (.ci/lower_bounds.py), torch kept at the CPU build.
# Exits non-zero on any failure. Run from anywhere: bash .ci/check_deps.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-$(sed -n 's/^TORCH[[:space:]]*?=[[:space:]]*//p' Makefile)}
TORCH=${TORCH:-torch==2.13.0}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/psa-deps.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
step() { printf '[check_deps %3ss] %s\n' "$SECONDS" "$*"; }
# pip prints a warning per package for the local index folders it cannot find; keep the log readable.
quiet_pip() { "$tmp/venv/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

step "throwaway venv in $tmp with $TORCH"
"$PYTHON" -m venv "$tmp/venv"
quiet_pip install --quiet --upgrade pip
quiet_pip install --quiet "$TORCH"
torch_version=$("$tmp/venv/bin/python" -c 'import importlib.metadata as m; print(m.version("torch"))')
step "torch $torch_version installed"

# Names of the packages a pip --report would install; argument: the report file.
report_names() {
    "$tmp/venv/bin/python" - "$1" <<'EOF'
import json, re, sys
for item in json.load(open(sys.argv[1]))["install"]:
    meta = item["metadata"]
    print(re.sub(r"[-_.]+", "-", meta["name"]).lower(), meta["version"])
EOF
}

# --- 1. no triton in a plain install -------------------------------------------------------------
step "1/2 dry run: pip install . (no extras)"
quiet_pip install --dry-run --quiet --report "$tmp/plain.json" .
report_names "$tmp/plain.json" > "$tmp/plain.txt"
echo "would install $(wc -l < "$tmp/plain.txt") packages: $(cut -d' ' -f1 "$tmp/plain.txt" | tr '\n' ' ')"
bad=$(grep -E '^(triton|torch|nvidia-.*) ' "$tmp/plain.txt" || true)
if [ -n "$bad" ]; then
    echo "FAIL: a CPU-only install without extras would install:" >&2
    echo "$bad" >&2
    echo "triton belongs in the 'interpret' extra only, and nothing may replace the CPU torch." >&2
    exit 1
fi
step "ok: no triton, CPU torch kept"

# --- 2. the lower bounds resolve together -------------------------------------------------------
step "2/2 dry run: every declared lower bound at once"
"$PYTHON" .ci/lower_bounds.py --all-extras --skip torch -o "$tmp/lower.txt"
echo "torch==$torch_version" >> "$tmp/lower.txt"
extras=$("$PYTHON" -c 'import tomllib
print(",".join(tomllib.load(open("pyproject.toml", "rb"))["project"].get("optional-dependencies", {})))')
echo "constraints: $(tr '\n' ' ' < "$tmp/lower.txt")"
if ! quiet_pip install --dry-run --quiet --report "$tmp/lower.json" -c "$tmp/lower.txt" ".[$extras]"; then
    echo "FAIL: the lower bounds in pyproject.toml cannot be installed together (constraints above)." >&2
    echo "pip's explanation:" >&2
    quiet_pip install --dry-run -c "$tmp/lower.txt" ".[$extras]" 2>&1 \
        | sed -n '/conflict is caused by/,$p' | head -n 40 >&2 || true
    exit 1
fi
report_names "$tmp/lower.json" > "$tmp/lower-resolved.txt"
bad=$(grep -E '^(torch|nvidia-.*) ' "$tmp/lower-resolved.txt" || true)
if [ -n "$bad" ]; then
    echo "FAIL: at the lower bounds pip would replace the CPU torch: $bad" >&2
    exit 1
fi
step "ok: the lower bounds resolve together ($(wc -l < "$tmp/lower-resolved.txt") packages)"
