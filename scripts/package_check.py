"""Packaging check, run by CI (.ci/run) with the development venv's Python: `python scripts/package_check.py`.

1. `python -m build` makes the sdist, then the wheel from that sdist (one compile, no build isolation: against
   the torch installed here).  The sdist must hold csrc/ and CMakeLists.txt; the wheel the compiled extension.
2. The wheel goes into a fresh venv (not editable; the checks run outside the source tree, which is not on
   sys.path), with the same torch from pip's local wheel, so nothing large downloads and no other torch is
   installed.  There the CLI runs end to end on a tiny model: prune -> saved checkpoint -> vanilla
   `from_pretrained` -> `fastprune inspect`; the extension loads and reports the torch it was compiled against.
   No optional extra is installed, so the widths chart is skipped with one line (README "Install").
3. Without a compiler: a wheel built from the same sdist with a PATH that has no cmake, c++ or nvcc holds no
   extension; installed over the first, with PATH still without them, prune (the same plan as with the
   extension), inspect, eval and sweep run on the reference kernels, with one warning naming what is missing.
4. pip's default isolated build stops early with an error that names --no-build-isolation.
The fresh venv and the tiny model are made while the extension compiles; the work folder is removed in the
background afterwards (a venv with torch takes about a minute of disk time to delete here).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START = time.monotonic()
TINY = """
import sys
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
import torch
chars = ["<unk>", "</s>", "\\n"] + [chr(c) for c in range(32, 127)]
tok = Tokenizer(WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\\s\\S]"), behavior="isolated")
tok.decoder = decoders.Fuse()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
torch.manual_seed(0)
config = LlamaConfig(vocab_size=len(chars), hidden_size=48, intermediate_size=64, num_hidden_layers=4,
                     num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
LlamaForCausalLM(config).save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])
"""
LOADS = """
import json, sys
import torch, fastprune
from pathlib import Path
from transformers import AutoModelForCausalLM
from fastprune.io import load_pruned
site = Path(fastprune.__file__).resolve()
assert Path(sys.prefix).resolve() in site.parents, f"fastprune imported from {site}, not the fresh venv"
assert not any(Path(p).resolve() == Path(sys.argv[2]) for p in sys.path if p), "the source tree is on sys.path"
expect_ext = sys.argv[3] == "1"
backends = fastprune.backends.available()
assert ("cpp" in backends) == expect_ext, backends
if expect_ext:
    from fastprune._native import _C
    assert _C.torch_version == torch.__version__.split("+")[0], (_C.torch_version, torch.__version__)
ckpt = sys.argv[1]
mine, _ = load_pruned(ckpt)
theirs = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True).eval()
ids = torch.randint(0, mine.config.vocab_size, (2, 17))
with torch.no_grad():
    assert torch.equal(mine(ids).logits, theirs(ids).logits), "from_pretrained gives other logits"
report = json.loads((Path(ckpt) / "report.json").read_text())
assert sum(p.numel() for p in theirs.parameters()) == report["report"]["params_after"]
print("loaded", ckpt, "with from_pretrained and load_pruned: same logits; backends", backends, file=sys.stderr)
"""
# the other commands in one process (one import of torch and transformers): inspect, eval, sweep
COMMANDS = """
import contextlib, io, json, sys
from fastprune.cli import main
ckpt, tiny, out = sys.argv[1:4]
def command(*argv):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([*argv, "--json"])
    assert code == 0, (argv, code)
    return json.loads(stdout.getvalue())
info = command("inspect", ckpt)
assert info["checkpoint"] and len(info["widths"]) == 4, info
rows = command("eval", "--model", tiny, "--model", ckpt, "--ppl", "austen", "--seq-lens", "64", "--eval-tokens",
               "256", "--zeroshot", "austen_next_sentence", "--engine", "native", "--limit", "2", "--n-items", "8",
               "--tasks-dir", out + "/tasks")["rows"]
assert rows[0]["params"] > rows[1]["params"] and rows[1]["ppl"]["austen@64"] > 1, rows
sweep = command("sweep", "--model", tiny, "--ratios", "0.2", "--calib", "austen", "--n-samples", "4", "--seq-len",
                "32", "--eval", "austen", "--eval-tokens", "256", "--eval-seq-len", "64", "--out", out + "/sweep")
assert [r["ratio"] for r in sweep["rows"]] == [0.0, 0.2], sweep["rows"]
with contextlib.redirect_stdout(io.StringIO()):
    assert main(["bench", "--inference", "--model", tiny, "--checkpoint", ckpt, "--prompt-len", "8", "--new-tokens",
                 "2", "--repeat", "1", "--attn", "sdpa", "--compile-backend", "none", "--out", out + "/bench"]) == 0
    assert main(["tune", "--model", ckpt, "--output", out + "/tune", "--max-steps", "1", "--batch-size", "2",
                 "--micro-batch-size", "2", "--seq-len", "32", "--warmup-steps", "0", "--val", ""]) == 0
import os
assert os.path.exists(out + "/tune/merged/config.json"), os.listdir(out + "/tune")
print("inspect, eval, sweep, bench, tune: ok", file=sys.stderr)
"""
INSPECT = """
import contextlib, io
from fastprune.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out):
    assert main(["inspect", ckpt, "--json"]) == 0
info = json.loads(out.getvalue())
assert info["checkpoint"] and len(info["widths"]) == 4, info
"""
PRUNE_ARGS = ["--ratio", "0.3", "--calib", "austen", "--n-samples", "4", "--seq-len", "32", "--eval", "austen",
              "--eval-tokens", "512", "--eval-seq-len", "64", "--prompt", ""]
NO_TOOLS = ("cmake", "c++", "g++", "gcc", "cc", "clang", "clang++", "nvcc")


def step(text: str) -> None:
    print(f"package_check [{time.monotonic() - START:5.0f} s] {text}", flush=True)


def start(cmd: list, *, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """Start ``cmd`` in the background (its output captured); :func:`finish` collects it."""
    return subprocess.Popen([str(c) for c in cmd], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc: subprocess.Popen, ok: bool = True) -> subprocess.CompletedProcess:
    """Wait for ``proc``; with ``ok`` a failure stops the check and shows its output."""
    out, err = proc.communicate()
    if ok and proc.returncode != 0:
        sys.exit(f"package_check: failed ({proc.returncode}): {' '.join(proc.args)}\n{out[-4000:]}\n{err[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run(cmd: list, *, env: dict | None = None, cwd: Path | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd``; with ``ok`` a failure stops the check and shows the output."""
    return finish(start(cmd, env=env, cwd=cwd), ok=ok)


def pip_install(python: Path, *args: str, env: dict | None = None) -> None:
    run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile", *args], env=env)


def check_sdist(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    tracked = run(["git", "ls-files", "csrc", "CMakeLists.txt", "setup.py", "pyproject.toml"], cwd=ROOT).stdout.split()
    missing = sorted(set(tracked) - names)
    assert not missing, f"the sdist lacks {missing}"
    assert not [n for n in names if n.endswith(".so")], "the sdist holds a built module"
    step(f"sdist {sdist.name}: {len(names)} files, csrc/ ({sum(n.startswith('csrc/') for n in names)}) and "
         "CMakeLists.txt in")


def wheel_names(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


def check_wheel(wheel: Path, with_ext: bool) -> None:
    names = wheel_names(wheel)
    modules = [n for n in names if n.startswith("fastprune/_native/_C") and n.endswith(".so")]
    assert bool(modules) == with_ext, f"{wheel.name}: extension modules {modules}"
    for needed in ("fastprune/remote/modeling_fastprune.py", "fastprune/resources/austen_emma.txt",
                   "fastprune/native_build.py"):
        assert needed in names, f"{wheel.name} lacks {needed}"
    assert any(n.startswith("fastprune/kernels/") for n in names), f"{wheel.name} lacks the Triton kernels"
    step(f"wheel {wheel.name}: {len(names)} files, extension {modules or 'absent'}")


def tool_free_path(work: Path, python: Path) -> str:
    """A PATH directory with the venv's executables and the system's, minus compilers, cmake and nvcc."""
    folder = work / "bin-no-compiler"
    folder.mkdir()
    for directory in [python.parent, *os.environ["PATH"].split(os.pathsep)]:
        if not os.path.isdir(directory):
            continue
        for entry in os.scandir(directory):
            name = entry.name
            if name in NO_TOOLS or name.startswith(("gcc-", "g++-", "clang-", "x86_64-linux-gnu-")):
                continue
            link = folder / name
            if not link.exists() and os.access(entry.path, os.X_OK):
                link.symlink_to(entry.path)
    for tool in NO_TOOLS:
        assert shutil.which(tool, path=str(folder)) is None, tool
    return str(folder)


def fresh_venv(build_python: Path, venv: Path, torch_version: str) -> Path:
    """A new venv with the build venv's base interpreter and the same torch, from pip's local wheel."""
    base = run([build_python, "-c", "import sys; print(sys._base_executable)"]).stdout.strip()
    run([base, "-m", "venv", venv])
    python = venv / "bin" / "python"
    pip_install(python, f"torch=={torch_version}")
    return python


def warnings_about_extension(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "compiled extension" in line]


def main() -> int:
    build_python = Path(sys.executable)
    import torch

    torch_version = torch.__version__
    work = Path(tempfile.mkdtemp(prefix="fastprune-package-"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FASTPRUNE_BACKEND", "FASTPRUNE_REQUIRE_EXT")}
    background = ThreadPoolExecutor(max_workers=1)
    try:
        # meanwhile (while the extension compiles): the tiny model, and a fresh venv with torch
        tiny = start([build_python, "-c", TINY, work / "tiny"], env=env, cwd=work)
        venv = work / "venv"
        venv_ready = background.submit(fresh_venv, build_python, venv, torch_version)
        # 1. sdist, then the wheel from it
        dist = work / "dist"
        run([build_python, "-m", "build", "--no-isolation", "--outdir", dist, ROOT],
            env={**env, "FASTPRUNE_REQUIRE_EXT": "1", "MAX_JOBS": env.get("MAX_JOBS", "2")})
        sdist, wheel = next(dist.glob("*.tar.gz")), next(dist.glob("*.whl"))
        step("built the sdist and, from it, the wheel")
        check_sdist(sdist)
        check_wheel(wheel, with_ext=True)
        # 4. (meanwhile) pip's default, isolated build: an early error naming the way to build
        isolated = start([build_python, "-m", "pip", "wheel", "--no-cache-dir", "--no-deps", "-w", work / "iso",
                          sdist], env=env)

        # 2. the wheel and its dependencies into the fresh venv; the CLI end to end from outside the tree
        python = venv_ready.result()
        pip_install(python, wheel)
        installed = run([python, "-c", "import torch; print(torch.__version__)"]).stdout.strip()
        assert installed == torch_version, f"the fresh venv got torch {installed}, not {torch_version}"
        step(f"fresh venv: torch {installed} (the local wheel) and {wheel.name}")
        fenv = {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}"}
        finish(tiny)
        cli = venv / "bin" / "fastprune"
        pruned = run([cli, "prune", "--model", work / "tiny", *PRUNE_ARGS, "--out", work / "pruned"],
                     env=fenv, cwd=work)
        assert not warnings_about_extension(pruned.stderr), pruned.stderr
        skipped = [line for line in pruned.stderr.splitlines() if "widths.png skipped" in line]
        assert len(skipped) == 1 and "fastprune[charts]" in skipped[0], pruned.stderr
        run([python, "-c", LOADS + INSPECT, work / "pruned", ROOT, "1"], env=fenv, cwd=work)
        step("CLI end to end with the extension: prune, save, from_pretrained, inspect")

        # 3. no compiler: build from the same sdist and run with cmake, c++ and nvcc off PATH
        bare = {**env, "PATH": tool_free_path(work, python)}
        run([build_python, "-m", "pip", "wheel", "-q", "--no-cache-dir", "--no-build-isolation", "--no-deps",
             "-w", work / "nocc", sdist], env=bare)
        plain = next((work / "nocc").glob("*.whl"))
        check_wheel(plain, with_ext=False)
        pip_install(python, "--force-reinstall", "--no-deps", plain, env=bare)
        assert not list(venv.glob("lib/python*/site-packages/fastprune/_native/_C*")), "the extension is still there"
        reference = run([cli, "prune", "--model", work / "tiny", *PRUNE_ARGS, "--out", work / "pruned-ref"],
                        env=bare, cwd=work)
        warned = warnings_about_extension(reference.stderr)
        assert len(warned) == 1 and "installed without its compiled extension" in warned[0], reference.stderr
        assert "cmake and a C++ compiler" in warned[0] and "not found on PATH" in warned[0], warned[0]
        plans = [json.loads((work / d / "fastprune_plan.json").read_text())["keep"] for d in ("pruned", "pruned-ref")]
        assert plans[0] == plans[1], "the reference kernels chose another plan than the compiled ones"
        others = run([python, "-c", COMMANDS, work / "pruned-ref", work / "tiny", work], env=bare, cwd=work)
        assert len(warnings_about_extension(others.stderr)) == 1, others.stderr
        step("no compiler: prune (the same plan), inspect, eval, sweep, bench, tune run with one warning each:\n  "
             + warned[0])

        iso = finish(isolated, ok=False)
        output = iso.stdout + iso.stderr
        assert iso.returncode != 0 and "--no-build-isolation" in output and "torch" in output, output[-3000:]
        step("an isolated build stopped early and named pip install --no-build-isolation")
    finally:
        background.shutdown(cancel_futures=True)
        # removing a venv with torch takes about a minute of disk time here: let it run on after this check
        subprocess.Popen(["rm", "-rf", str(work)], start_new_session=True)
    step("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
