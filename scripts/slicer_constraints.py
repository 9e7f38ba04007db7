"""Write the pip constraints file of one 3D Slicer release from its SuperBuild files.

Usage: python scripts/slicer_constraints.py SLICER_GIT_DIR TAG OUT.txt
   e.g. python scripts/slicer_constraints.py ~/src/Slicer/.git v5.10.0 \
            AACScore/Resources/SlicerConstraints/slicer-5.10.txt

A Slicer release installs a fixed set of Python packages (SuperBuild/External_python-*.cmake, hash-pinned), builds
VTK and SimpleITK itself, and runs one Python version (Slicer_REQUIRED_PYTHON_VERSION). The file lists them
pinned, with the Python version in a `# python:` line, so that tests can resolve AACScore's dependency set
against exactly what that release bundles.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def show(git_dir: str, tag: str, path: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, "show", f"{tag}:{path}"], check=True, capture_output=True,
                          text=True).stdout


def files(git_dir: str, tag: str, folder: str) -> list[str]:
    listing = subprocess.run(["git", "--git-dir", git_dir, "ls-tree", "--name-only", tag, folder + "/"],
                             check=True, capture_output=True, text=True).stdout
    return listing.split()


def bundled(git_dir: str, tag: str) -> tuple[str, dict[str, str]]:
    python = re.search(r'set\(Slicer_REQUIRED_PYTHON_VERSION "([\d.]+)"\)', show(git_dir, tag, "CMakeLists.txt"))
    packages: dict[str, str] = {}
    for path in files(git_dir, tag, "SuperBuild"):
        if Path(path).name.startswith("External_python-"):
            for name, version in re.findall(r"^\s*([A-Za-z0-9_.\-]+)==([^\s;\\]+)", show(git_dir, tag, path), re.M):
                packages[re.sub(r"[-_.]+", "-", name).lower()] = version
    cmake = show(git_dir, tag, "CMakeLists.txt")
    minor = re.search(r'set\(_default_vtk_minor_version "(\d+)"\)', cmake).group(1)
    vtk = show(git_dir, tag, "SuperBuild/External_VTK.cmake")
    packages["vtk"] = re.search(r'STREQUAL "9\.%s"\)\s*\n(?:.*\n)*?\s*set\(vtk_dist_info_version "([^"]+)"\)' % minor,
                                vtk).group(1)
    if "simpleitk" not in packages:  # built from Slicer's fork: the version is in the tag's comment
        simpleitk = show(git_dir, tag, "SuperBuild/External_SimpleITK.cmake")
        packages["simpleitk"] = re.search(r"# slicer-v([\d.]+)-", simpleitk).group(1)
    return python.group(1), dict(sorted(packages.items()))


def main(git_dir: str, tag: str, out: str) -> None:
    python, packages = bundled(git_dir, tag)
    lines = [f"# Python packages bundled with 3D Slicer {tag.lstrip('v')} (from its SuperBuild files;",
             "# written by scripts/slicer_constraints.py). AACScore never replaces them.",
             f"# python: {python}"]
    lines += [f"{name}=={version}" for name, version in packages.items()]
    Path(out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:4])
