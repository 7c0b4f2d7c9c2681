#!/usr/bin/env bash
# The Python environment the server tests drive `mmllm serve` with: the official `openai`
# client from PyPI, pinned, in target/test-venv (git-ignored). Safe to run again: it does
# nothing when the pinned version is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
OPENAI_VERSION=3.57.0
venv=target/test-venv
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')" 2>/dev/null; then
  exit 0
fi
echo "test_venv: creating $venv with openai==$OPENAI_VERSION" >&2
python3 -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "openai==$OPENAI_VERSION"
