"""Build script. The C++/CUDA extension is built just in time on first use by default,
from the sources a wheel carries inside the package (``fused_sched/csrc``) or, in a
checkout or an editable install, from ``csrc/`` beside it.
``FUSED_SCHED_BUILD_EXT=1 pip install --no-build-isolation .`` builds it ahead of time
instead (it needs the torch you run with, hence no build isolation)."""

import importlib.util
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class build_py_with_sources(build_py):
    """Puts csrc/ inside the package, so that an installed wheel can build the extension
    just in time; an editable install reads csrc/ where it is."""

    def run(self):
        super().run()
        if not self.editable_mode:
            self.copy_tree(str(ROOT / "csrc"), os.path.join(self.build_lib, "fused_sched", "csrc"))


ext_modules, cmdclass = [], {"build_py": build_py_with_sources}
if os.environ.get("FUSED_SCHED_BUILD_EXT") == "1":
    # Loaded by path: importing the package would import diffusers, which a build
    # environment need not have yet.
    path = ROOT / "fused_sched" / "ops" / "extension.py"
    spec = importlib.util.spec_from_file_location("fused_sched_build_extension", path)
    extension = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(extension)
    ext_modules, build_commands = extension.extension_modules()
    cmdclass.update(build_commands)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
