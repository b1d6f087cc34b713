"""What ``python -m build`` made is what a user should get: run by ``scripts/test`` on ``dist/``.

The wheel holds the package with its ``py.typed`` marker (PEP 561), the license, the entry point, and no
tests; the sdist holds the sources, tests and license; both carry the version ``ktls.__version__`` says.
"""

from __future__ import annotations

import re
import sys
import tarfile
import zipfile
from pathlib import Path


def main(dist: Path) -> int:
    version = re.search(r'__version__ = "([^"]+)"', Path("src/ktls/__init__.py").read_text())
    assert version is not None, "src/ktls/__init__.py has no __version__"
    wheels = list(dist.glob(f"ktls-{version[1]}-py3-none-any.whl"))
    sdists = list(dist.glob(f"ktls-{version[1]}.tar.gz"))
    problems = []
    if len(wheels) != 1 or len(sdists) != 1:
        problems.append(f"expected one wheel and one sdist of version {version[1]} in {dist}")
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
        for needed in ("ktls/__init__.py", "ktls/py.typed", "ktls/serve/server.py", "ktls/tls/proof.py"):
            if needed not in names:
                problems.append(f"{wheel.name} lacks {needed}")
        if not any(name.endswith("/licenses/LICENSE") for name in names):
            problems.append(f"{wheel.name} lacks the license")
        if not any(name.endswith("/entry_points.txt") for name in names):
            problems.append(f"{wheel.name} lacks the ktls command")
        if stray := [name for name in names if name.startswith(("tests/", "bench/", "scripts/"))]:
            problems.append(f"{wheel.name} holds files that are not the library: {stray[:5]}")
    for sdist in sdists:
        with tarfile.open(sdist) as archive:
            names = archive.getnames()
        for needed in ("LICENSE", "README.md", "pyproject.toml", "src/ktls/py.typed", "tests/conftest.py"):
            if not any(name.endswith(f"/{needed}") for name in names):
                problems.append(f"{sdist.name} lacks {needed}")
    for problem in problems:
        print(f"check_dist: {problem}", file=sys.stderr)
    if not problems:
        print(f"check_dist: {', '.join(p.name for p in wheels + sdists)} ok")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "dist")))
