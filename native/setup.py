"""Builds ``_nwcap_walk``, the C version of analyzer/capture/engine.py's record loop.

Kept a distribution of its own, beside the source-deployed ``analyzer`` package, so that the
Functions remote build (which runs ``pip install -r requirements.txt``) compiles it for the
app's Python; nwcap runs the same analysis in pure Python when it is missing.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "_nwcap_walk",
            sources=["_nwcap_walk.c"],
            extra_compile_args=["-Wall", "-Wextra", "-Wno-unused-parameter"],
            # no compiler where it is installed: install without it, nwcap runs in Python
            optional=True,
        )
    ],
)
