"""What scripts/setup.sh does about torch in the Python that runs this: prints one line.

``keep VERSION``: a torch fastprune supports is installed; setup.sh keeps it (your CUDA build stays).
``install``: no torch; setup.sh installs this machine's local torch 2.13.0 wheel.
Exit 1 with the reason on stderr: a torch older than fastprune supports, or one that does not import;
setup.sh then stops rather than replacing a torch you chose.
"""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _native_build():
    spec = importlib.util.spec_from_file_location("fastprune_native_build", ROOT / "fastprune" / "native_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    native = _native_build()
    if importlib.util.find_spec("torch") is None:
        print("install")
        return 0
    try:
        import torch
    except Exception as exc:  # a broken install: a missing CUDA library, an ABI clash ...
        print(f"setup.sh: torch is installed in {sys.prefix} but does not import ({type(exc).__name__}: {exc}); "
              "repair or remove it, then run setup again", file=sys.stderr)
        return 1
    if not native.torch_supported(torch.__version__):
        print(f"setup.sh: torch {torch.__version__} is installed in {sys.prefix}, and fastprune needs "
              f"torch>={native.MIN_TORCH}. Upgrade it (the build for your CUDA version, e.g. pip install "
              f"'torch>={native.MIN_TORCH}' --index-url https://download.pytorch.org/whl/cu128), or point VENV at "
              "another environment; setup does not replace a torch you installed", file=sys.stderr)
        return 1
    print(f"keep {torch.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
