"""The interop suite's server environments: built once, cached outside the repo, reused.

Each lives in `$INTEROP_CACHE` (default `~/.cache/inference-gateway-interop/`), in a folder
named by what it pins, so a new pin builds a new folder and an old one is never half reused:

- `litellm-<version>-<hash>/venv`: LiteLLM's proxy, from PyPI, exactly as locks/litellm.txt
  lists it (the pip freeze of the `litellm[proxy]==<version>` venv this suite was tested on).
- `llama-<version>-<hash>/venv`: llama-cpp-python's server (compiles llama.cpp: the long one)
  and `gguf`, exactly as locks/llama.txt lists them; gguf's Python writes the tiny model
  (`models/tiny-<hash>.gguf`, by make_tiny_gguf.py).
- `node-openai-<version>/`: the `openai` npm package, where `node` and `npm` exist.

`<hash>` covers the lock file (and, for llama, the CMake arguments). To move a pin: change it
here, build with INTEROP_UNLOCKED=1 (the top-level pins only; folders `...-unlocked`), run the
suite, then `python -m tests.interop.envs freeze` rewrites the locks from those venvs.

A folder counts once its `.ok` file is written, after a build that succeeded; a failed or cut
build leaves no `.ok` and is redone from scratch. Builds hold a lock file, so two test runs on
one machine do not build the same thing at once. `python -m tests.interop.envs` builds them
all ahead of a run (and prints how long each took).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "GGUF",
    "LITELLM",
    "LLAMA_CPP",
    "NODE_OPENAI",
    "BuildError",
    "cache_dir",
    "litellm_env",
    "llama_env",
    "node_env",
    "tiny_model",
]

LITELLM = "1.106.12"  # the newest whose [proxy] extra resolves from PyPI (1.109+ want a
# `litellm-proxy` package that is not published)
LLAMA_CPP = "0.3.36"
GGUF = "0.19.0"
NODE_OPENAI = "7.59.0"

HERE = Path(__file__).resolve().parent
LOCKS = HERE / "locks"
INSTALL_TIMEOUT = 40 * 60  # a cold llama.cpp compile on 2 busy cores, with room


class BuildError(RuntimeError):
    """An environment could not be built; the message carries the tail of the log."""


def cache_dir() -> Path:
    root = os.environ.get("INTEROP_CACHE") or str(Path.home() / ".cache/inference-gateway-interop")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def _locked(name: str) -> Iterator[None]:
    with open(cache_dir() / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(
    args: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> None:
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(args)}\n".encode())
        out.flush()
        try:
            done = subprocess.run(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                timeout=INSTALL_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise BuildError(f"{args[0]} took over {INSTALL_TIMEOUT}s; see {log}") from None
    if done.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        raise BuildError(f"{' '.join(args)} exited {done.returncode}; {log}:\n" + "\n".join(tail))


@dataclass(frozen=True)
class Built:
    path: Path
    seconds: float  # 0.0 when it came from the cache


def _build(name: str, make: Callable[[Path, Path], None]) -> Built:
    """`cache/<name>`, made by `make(folder, log)` unless a finished one is there."""
    folder = cache_dir() / name
    if (folder / ".ok").exists():
        return Built(folder, 0.0)
    with _locked(name):
        if (folder / ".ok").exists():  # another run built it while this one waited
            return Built(folder, 0.0)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        log = folder / "build.log"
        started = time.monotonic()
        make(folder, log)
        seconds = time.monotonic() - started
        (folder / ".ok").write_text(f"built in {seconds:.0f}s\n")
        return Built(folder, seconds)


def _venv(folder: Path, log: Path, *requirements: str, env: dict[str, str] | None = None) -> None:
    _run([sys.executable, "-m", "venv", str(folder / "venv")], log)
    pip = [str(folder / "venv/bin/python"), "-m", "pip", "install", "--disable-pip-version-check"]
    _run([*pip, *requirements], log, env)


def _unlocked() -> bool:
    return os.environ.get("INTEROP_UNLOCKED") == "1"


def _requirements(lock: str, *pins: str, salt: str = "") -> tuple[str, list[str]]:
    """(folder suffix, pip arguments): the lock file's exact set, or the top-level pins."""
    if _unlocked():
        return "unlocked", list(pins)
    path = LOCKS / lock
    digest = hashlib.sha256(path.read_bytes() + salt.encode()).hexdigest()[:10]
    return digest, ["-r", str(path)]


def litellm_env() -> Built:
    suffix, requirements = _requirements("litellm.txt", f"litellm[proxy]=={LITELLM}")
    return _build(
        f"litellm-{LITELLM}-{suffix}", lambda folder, log: _venv(folder, log, *requirements)
    )


def llama_env() -> Built:
    # Not mtmd (images and audio: llama_cpp imports it only for a multimodal chat handler),
    # 51 of the 178 objects; and at -O1, which compiles faster than the release -O3 and runs
    # a 64-dimension model no slower that anyone could tell. INTEROP_CMAKE_ARGS replaces
    # these (e.g. add -DGGML_NATIVE=OFF for a cache shared by machines of different CPUs).
    cmake = os.environ.get(
        "INTEROP_CMAKE_ARGS",
        "-DLLAVA_BUILD=OFF -DCMAKE_C_FLAGS_RELEASE=-O1 -DCMAKE_CXX_FLAGS_RELEASE=-O1",
    )
    suffix, requirements = _requirements(
        "llama.txt", f"llama-cpp-python[server]=={LLAMA_CPP}", f"gguf=={GGUF}", salt=cmake
    )
    return _build(
        f"llama-{LLAMA_CPP}-{suffix}",
        lambda folder, log: _venv(
            folder,
            log,
            # pip's wheel cache would hand back a wheel built with other CMake arguments
            "--no-cache-dir",
            *requirements,
            env={"CMAKE_ARGS": cmake},
        ),
    )


def tiny_model() -> Path:
    """The tiny random-weight GGUF, written by this checkout's make_tiny_gguf.py (its hash
    names the file, so a changed script writes a new model)."""
    script = HERE / "make_tiny_gguf.py"
    digest = hashlib.sha256(script.read_bytes()).hexdigest()[:12]
    built = llama_env()
    models = cache_dir() / "models"
    models.mkdir(exist_ok=True)
    path = models / f"tiny-{digest}.gguf"
    if not path.exists():
        with _locked("models"):
            if not path.exists():
                partial = path.with_suffix(".partial")
                _run(
                    [str(built.path / "venv/bin/python"), str(script), str(partial)],
                    models / "build.log",
                )
                partial.rename(path)
    return path


def node_tools() -> tuple[str, str] | None:
    """(node, npm) paths when both exist and node runs, else None."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return None
    try:
        subprocess.run([node, "--version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return node, npm


def node_env() -> Built | None:
    """A folder with `node_modules/openai`, or None without node and npm."""
    tools = node_tools()
    if tools is None:
        return None
    _, npm = tools
    return _build(
        f"node-openai-{NODE_OPENAI}",
        lambda folder, log: _run(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error",
             f"openai@{NODE_OPENAI}"],
            log,
            cwd=folder,
        ),
    )  # fmt: skip


def freeze() -> None:
    """Rewrite locks/*.txt from the INTEROP_UNLOCKED=1 venvs (built if missing)."""
    os.environ["INTEROP_UNLOCKED"] = "1"
    for lock, build, what in (
        ("litellm.txt", litellm_env, f"litellm[proxy]=={LITELLM}"),
        ("llama.txt", llama_env, f"llama-cpp-python[server]=={LLAMA_CPP} and gguf=={GGUF}"),
    ):
        python = str(build().path / "venv/bin/python")
        frozen = subprocess.run(
            [python, "-m", "pip", "freeze", "--disable-pip-version-check"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        head = (
            f"# The interop suite's venv, as built and tested: pip freeze of {what} on Python "
            f"{sys.version_info.major}.{sys.version_info.minor}.\n"
            "# Rewrite with: python -m tests.interop.envs freeze\n"
        )
        (LOCKS / lock).write_text(head + frozen)
        print(f"wrote {LOCKS / lock}")


def main() -> None:
    if sys.argv[1:] == ["freeze"]:
        freeze()
        return
    for name, build in (("litellm", litellm_env), ("llama", llama_env), ("node", node_env)):
        started = time.monotonic()
        built = build()
        if built is None:
            print(f"{name}: skipped (no node/npm)")
        elif built.seconds:
            print(f"{name}: built {built.path} in {built.seconds:.0f}s")
        else:
            print(f"{name}: cached {built.path} ({time.monotonic() - started:.1f}s)")
    print(f"model: {tiny_model()}")


if __name__ == "__main__":
    main()
