"""Installing model packages with every converter the project has, and the `aacscore models` command.

packages.py is the framework-free package format (manifest, sha256, install, lookup); the nnU-Net results
converter lives with the segmenter. This module joins the two, so neither has to import the other.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import ModelPackageError
from .packages import (ModelPackage, Progress, available_text, find_package, install_package, list_packages,
                       models_home, package_paths, read_package, verify_package)


def install_model(
    source: str | Path,
    sha256: str | None = None,
    models_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> ModelPackage:
    """`packages.install_package`, with nnU-Net v2 results folders and export zips converted on the way in."""

    def convert_nnunet(results: Path, out_dir: Path):
        try:
            from .segmentation.package import convert_nnunet_results
        except ImportError as error:
            raise ModelPackageError(
                f"{source}: is an nnU-Net results folder, but conversion is unavailable ({error})"
            ) from None
        return convert_nnunet_results(results, out_dir)

    return install_package(source, sha256=sha256, models_dir=models_dir, progress=progress,
                           convert_results=convert_nnunet)



def add_commands(subparsers) -> None:
    """Add `install`, `list` and `verify`; shared by `setup_weights.py` and `aacscore models`."""
    install = subparsers.add_parser("install", help="install a model package from a folder, zip or URL")
    install.add_argument("source", metavar="PATH_OR_URL", help="package folder, .zip, nnU-Net results, or URL")
    install.add_argument("--sha256", metavar="HEX", help="expected sha256 of the zip or download")
    install.set_defaults(func=_install_command)
    listing = subparsers.add_parser("list", help="list installed and bundled model packages")
    listing.set_defaults(func=_list_command)
    verify = subparsers.add_parser("verify", help="check packages' files against their manifests")
    verify.add_argument("name", nargs="?", metavar="NAME", help="name, name==version or path (default: all)")
    verify.set_defaults(func=_verify_command)
    for parser in (install, listing, verify):
        parser.add_argument("--models-dir", metavar="DIR", help=f"install folder (default: {models_home()})")


def add_cli(subparsers) -> None:
    """`aacscore models install|list|verify`."""
    models = subparsers.add_parser("models", help="install, list and verify model packages")
    add_commands(models.add_subparsers(dest="models_command", required=True, metavar="ACTION"))


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join([*(cell.ljust(width) for cell, width in zip(row, widths)), row[-1]]).rstrip())


def _print_progress(done: int, total: int | None) -> None:
    if not sys.stderr.isatty():
        return
    shown = f"{done / 1e6:.1f} MB" + (f" of {total / 1e6:.1f} MB ({100 * done // max(total, 1)}%)" if total else "")
    print(f"\rdownloading {shown}", end="\n" if total and done >= total else "", file=sys.stderr, flush=True)


def _install_command(args) -> int:
    package = install_model(args.source, sha256=args.sha256, models_dir=args.models_dir, progress=_print_progress)
    print(f"installed {package.name}=={package.version} ({package.kind}) in {package.path}")
    return 0


def _list_command(args) -> int:
    packages = list_packages(args.models_dir)
    if not packages:
        print(f"no model packages in {args.models_dir or models_home()} nor bundled; {available_text(packages)}")
        return 0
    rows = [(p.name, p.version, p.kind, "bundled" if p.bundled else "installed", str(p.path)) for p in packages]
    _print_table(("NAME", "VERSION", "KIND", "SOURCE", "PATH"), rows)
    return 0


def _verify_command(args) -> int:
    if args.name:
        paths = [find_package(args.name, None, args.models_dir).path]
    else:
        paths = package_paths(args.models_dir)
        if not paths:
            print(f"no model packages in {args.models_dir or models_home()} nor bundled; {available_text([])}")
            return 0
    rows, failed = [], 0
    for path in paths:
        name, version, kind = path.name, "?", "?"
        try:
            package = read_package(path)
            name, version, kind = package.name, package.version, package.kind
            verify_package(path)
            status = "ok"
        except ModelPackageError as error:
            failed += 1
            status = f"FAILED: {error}"
        rows.append((name, version, kind, status))
    _print_table(("NAME", "VERSION", "KIND", "STATUS"), rows)
    return 1 if failed else 0
