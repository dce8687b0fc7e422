#!/usr/bin/env bash
# CI stage "lowest": the test suite with every dependency at the floor pyproject.toml declares
# (constraints-lowest.txt), in a cached environment .venv-clients/lowest (rebuilt when the constraints,
# pyproject.toml, the torch pin or the Python version change). A failure here means a floor in pyproject.toml is wrong.
set -euo pipefail
cd "$(dirname "$0")/.."
VENVS="${MMLOOM_CLIENT_VENVS:-.venv-clients}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
dir="$VENVS/lowest"
want="$( (cat constraints-lowest.txt pyproject.toml; echo "$TORCH_SPEC"; "$PYTHON" --version) | sha256sum | cut -d' ' -f1)"
if [ ! -f "$dir/.stamp" ] || [ "$(cat "$dir/.stamp")" != "$want" ]; then
  echo "lowest: building $dir"
  rm -rf "$dir"
  "$PYTHON" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  "$dir/bin/python" -m pip install -q $TORCH_SPEC  # first and pinned
  "$dir/bin/python" -m pip install -q -c constraints-lowest.txt -e ".[dev]"
  echo "$want" > "$dir/.stamp"
fi
"$dir/bin/python" -m pip list --format=freeze 2>/dev/null | grep -i -E "^(torch|transformers|tokenizers|peft|numpy|pillow)=="
"$dir/bin/python" -m pytest tests --ignore=tests/clients -p no:cacheprovider "$@"
