"""Build script. The C++/CUDA extension is built just in time on first use by default.
``FUSED_SCHED_BUILD_EXT=1 pip install --no-build-isolation -e .`` builds it ahead of time
instead (it needs the torch you run with, hence no build isolation)."""

import os

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("FUSED_SCHED_BUILD_EXT") == "1":
    from fused_sched.ops.extension import extension_modules

    ext_modules, cmdclass = extension_modules()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
