"""Build script. The C++/CUDA extension is built just in time on first use by default.
``FUSED_SCHED_BUILD_EXT=1 pip install --no-build-isolation -e .`` builds it ahead of time
instead (it needs the torch you run with, hence no build isolation)."""

import importlib.util
import os
from pathlib import Path

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("FUSED_SCHED_BUILD_EXT") == "1":
    # Loaded by path: importing the package would import diffusers, which a build
    # environment need not have yet.
    path = Path(__file__).resolve().parent / "fused_sched" / "ops" / "extension.py"
    spec = importlib.util.spec_from_file_location("fused_sched_build_extension", path)
    extension = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extension)
    ext_modules, cmdclass = extension.extension_modules()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
