#!/usr/bin/env bash
# Create the separate virtual environment that runs Atropos (run-api and environment processes).
#
# atroposlib pins packages that conflict with paraloop's own venv, so it lives in its own one:
#   scripts/setup-atropos-venv.sh [VENV_DIR]        (default: .venv-atropos next to this repo's .venv)
# Only PyPI packages; no torch (atroposlib's base install does not need it: the API server and
# environments of server type vllm/openai only use transformers for tokenizers).
# Idempotent: an existing venv whose atroposlib is the pinned version is left as it is.
set -euo pipefail

ATROPOSLIB_VERSION="0.4.0"
# transformers >= 5 so tokenizers saved by paraloop's venv (transformers 5.x) load here too.
EXTRA_PACKAGES=("transformers>=5,<6")

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$repo_root/.venv-atropos}"
python="${PYTHON:-python3}"

if [[ -x "$venv/bin/python" ]] &&
    "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('atroposlib') != '$ATROPOSLIB_VERSION')" 2>/dev/null; then
    echo "atropos venv ready: $venv (atroposlib $ATROPOSLIB_VERSION)"
    exit 0
fi

start=$(date +%s)
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "atroposlib==$ATROPOSLIB_VERSION" "${EXTRA_PACKAGES[@]}"
# Fail here, not in a test, if the pieces paraloop drives are missing.
HF_HUB_OFFLINE=1 WANDB_MODE=disabled "$venv/bin/python" -c \
    "import atroposlib.api.server, atroposlib.envs.base, atroposlib.envs.server_handling.managed_server"
test -x "$venv/bin/run-api"
echo "atropos venv ready: $venv (atroposlib $ATROPOSLIB_VERSION) in $(($(date +%s) - start)) s"
