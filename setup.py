"""Ships the repository's ``config/`` inside the package (``adaptive/_config``), so an
installed wheel finds its configuration (:func:`adaptive.config.config_dir`). Everything
else about the package is in pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONFIG = Path(__file__).resolve().parent / "config"


class BuildPyWithConfig(build_py):
    """``build_py`` that also copies ``config/**.toml`` to ``<build>/adaptive/_config``."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "adaptive" / "_config"
        if target.exists():
            shutil.rmtree(target)
        for src in sorted(CONFIG.rglob("*.toml")):
            dst = target / src.relative_to(CONFIG)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


setup(cmdclass={"build_py": BuildPyWithConfig})
