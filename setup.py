"""Builds ``analyzer.capture._walk``, the C twin of the engine's two hot loops.

Everything else about the package is in pyproject.toml; this file only declares the extension
(setuptools reads ``ext_modules`` from here on every version pyproject.toml allows). It is
optional: where no C compiler works, the install goes on without it and nwcap runs the same
loops in Python (``nwcap --version`` says which walk runs, and the CLI says so once on stderr).
An editable install (``pip install -e .``, and ``-e .`` in requirements.txt for the Functions
remote build) compiles it in place, next to analyzer/capture/_walk.c.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "analyzer.capture._walk",
            sources=["analyzer/capture/_walk.c"],
            extra_compile_args=["-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        )
    ],
)
