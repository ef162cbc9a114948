"""Every way nwcap is installed builds its compiled record walk, or falls back to Python aloud.

Each test installs a copy of the project into a new, empty virtualenv (or, for the Functions
route, into a ``--target`` folder as the remote build does), offline: the build uses this
interpreter's setuptools (``--no-build-isolation --no-index``) and ``--no-deps``, since
``nwcap analyze`` needs no third-party package. pipx installs exactly as ``pip install .`` into
a venv of its own does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import setuptools

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "foreign-storage-account.cap"
NOTICE = "nwcap: note: the record walk runs in Python"
SITE = Path("lib") / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
WALK = "analyzer.capture._walk"
DESCRIBE = (
    "import analyzer, analyzer.capture.compiled as c; "
    "print(c.walk_description()); print(analyzer.__file__)"
)


@pytest.fixture(scope="module")
def build_tools(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This interpreter's setuptools, copied, for the new venvs to build with offline."""
    tools = tmp_path_factory.mktemp("build-tools")
    installed = Path(setuptools.__file__).parent.parent
    for name in ("setuptools", "_distutils_hack", "pkg_resources"):
        if (installed / name).is_dir():
            shutil.copytree(installed / name, tools / name)
    for info in installed.glob("setuptools-*.dist-info"):
        shutil.copytree(info, tools / info.name)
    return tools


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """What a build reads of the project (never a local build's binary)."""
    copy = tmp_path / "nwcap"
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info", "build")
    shutil.copytree(ROOT / "analyzer", copy / "analyzer", ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md", "requirements.txt"):
        shutil.copy2(ROOT / name, copy / name)
    return copy


def new_venv(where: Path, build_tools: Path) -> Path:
    """An empty venv that can build with ``build_tools``; its interpreter."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (site / "nwcap_build_tools.pth").write_text(f"{build_tools}\n")
    return python


def pip(python: Path, *arguments: str, cwd: Path, compiler: str | None = None) -> None:
    """pip (this one) acting on ``python``'s environment, offline."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if compiler is not None:
        env["CC"] = compiler
    command = [sys.executable, "-m", "pip", "--python", str(python), *arguments]
    command += ["--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
    done = subprocess.run(command, check=False, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def run(python: Path, *arguments: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``python`` run from ``cwd`` (never the project: it would shadow the install)."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("NWCAP_", "PYTHON"))}
    done = subprocess.run(
        [str(python), *arguments],
        check=False,
        cwd=cwd,
        env={**environment, **env},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return done


def described(python: Path, cwd: Path, **env: str) -> tuple[str, Path]:
    """Which walk runs under ``python``, and where its ``analyzer`` package was found."""
    walk, package = run(python, "-c", DESCRIBE, cwd=cwd, **env).stdout.splitlines()
    return walk, Path(package).parent


def analyze_sample(venv: Path) -> subprocess.CompletedProcess[str]:
    return run(venv / "bin" / "nwcap", "analyze", "--format", "json", str(SAMPLE), cwd=venv)


class TestInstallRoutes:
    """pip install ., pip install -e ., a wheel and the remote build's requirements.txt."""

    def test_pip_install(self, tmp_path: Path, source: Path, build_tools: Path) -> None:
        python = new_venv(tmp_path / "venv", build_tools)
        pip(python, "install", str(source), cwd=tmp_path)
        walk, package = described(python, tmp_path)
        assert walk == "compiled"
        assert package.is_relative_to(tmp_path / "venv")
        done = analyze_sample(tmp_path / "venv")
        assert '"packets": 142' in done.stdout
        assert NOTICE not in done.stderr

    def test_editable_builds_in_place(
        self, tmp_path: Path, source: Path, build_tools: Path
    ) -> None:
        python = new_venv(tmp_path / "venv", build_tools)
        pip(python, "install", "-e", str(source), cwd=tmp_path)
        assert list((source / "analyzer" / "capture").glob("_walk.*.so"))
        walk, package = described(python, tmp_path)
        assert walk == "compiled"
        assert package == source / "analyzer"
        assert NOTICE not in analyze_sample(tmp_path / "venv").stderr

    def test_wheel(self, tmp_path: Path, source: Path, build_tools: Path) -> None:
        python = new_venv(tmp_path / "venv", build_tools)
        pip(python, "wheel", "--wheel-dir", str(tmp_path / "wheels"), str(source), cwd=tmp_path)
        [wheel] = (tmp_path / "wheels").glob("nwcap-*.whl")
        assert sysconfig.get_platform().replace("-", "_") in wheel.name  # not py3-none-any
        names = zipfile.ZipFile(wheel).namelist()
        assert any(n.startswith("analyzer/capture/_walk.") and n.endswith(".so") for n in names)
        pip(python, "install", str(wheel), cwd=tmp_path)
        assert described(python, tmp_path)[0] == "compiled"

    def test_functions_remote_build(self, tmp_path: Path, source: Path, build_tools: Path) -> None:
        """As the remote build does: requirements.txt into .python_packages from the deployed
        source; the walk is compiled beside that source, and no second copy of it installed."""
        python = new_venv(tmp_path / "venv", build_tools)
        editable = [
            line
            for line in (source / "requirements.txt").read_text().splitlines()
            if line.startswith("-e ")
        ]
        assert editable == ["-e ."]
        (tmp_path / "nwcap-only.txt").write_text("\n".join(editable) + "\n")
        packages = source / ".python_packages" / "lib" / "site-packages"
        requirements = str(tmp_path / "nwcap-only.txt")
        pip(python, "install", "-r", requirements, "--target", str(packages), cwd=source)
        assert not (packages / "analyzer").exists()
        # the Functions host runs the app from its folder with .python_packages on the path
        walk, package = described(python, source, PYTHONPATH=str(packages))
        assert walk == "compiled"
        assert package == source / "analyzer"


class TestWithoutCompiler:
    """No working C compiler: the install succeeds, the Python walk runs, the CLI says so."""

    def test_fallback_and_notice(self, tmp_path: Path, source: Path, build_tools: Path) -> None:
        python = new_venv(tmp_path / "venv", build_tools)
        pip(python, "install", str(source), cwd=tmp_path, compiler="/bin/false")
        walk, _ = described(python, tmp_path)
        assert walk.startswith("python (the compiled walk was not built")
        done = analyze_sample(tmp_path / "venv")
        assert '"packets": 142' in done.stdout
        notices = [line for line in done.stderr.splitlines() if line.startswith(NOTICE)]
        assert len(notices) == 1
        # asked for by NWCAP_PURE_PYTHON, the Python walk is no fallback: nothing to say
        asked = run(
            tmp_path / "venv" / "bin" / "nwcap",
            "analyze",
            str(SAMPLE),
            cwd=tmp_path,
            NWCAP_PURE_PYTHON="1",
        )
        assert NOTICE not in asked.stderr
