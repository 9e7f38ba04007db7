"""Model packages: a folder or zip holding `manifest.json` and safetensors weights, each file pinned by sha256.

Why packages rather than loose weight files: a model is only usable with the settings it was trained with
(architecture, input size, label names), and users must be able to install one offline, check it was not
corrupted or swapped, and know what it was trained on. So every model load goes through `load_safetensors`,
which re-checks the file's checksum against the manifest, and every install builds the package in a hidden
folder beside its destination and renames it into place, so that an interrupted install leaves nothing half
there (the cache corruption users of other Slicer extensions run into).

Installed packages live in `models_home()/<name>-<version>/`; demo packages shipped with the extension live
in `AACScore/Resources/Models/<name>/`. Both are found by `list_packages` and `find_package`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from .errors import ModelPackageError
from .io.checksums import sha256_file

MANIFEST = "manifest.json"
MANIFEST_SEAL = "manifest.sha256"
"""Written beside the manifest on install (and by `write_package`): the sha256 of the manifest's bytes, so that an
edited manifest (another input size, say) is refused at load, as an edited weights file is."""
KINDS = ("segmenter", "scorer", "upright")
BUNDLED_MODELS = Path(__file__).parents[1] / "Resources" / "Models"
# Files of these types drive loading, so one that the manifest does not pin is refused rather than ignored.
PINNED_SUFFIXES = (".safetensors", ".json")
# Manifest fields and the type each must have.
REQUIRED_FIELDS: dict[str, type] = {
    "name": str,
    "version": str,
    "kind": str,
    "architecture": dict,
    "input": dict,
    "labels": list,
    "training_data": dict,
    "metrics": dict,
    "files": dict,
}
# Names and versions become folder names: keep them to characters that are safe on every file system.
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20
_log = logging.getLogger(__name__)

Progress = Callable[[int, "int | None"], None]
ResultsConverter = Callable[[Path, Path], "str | Path"]
"""(results folder, output folder) -> the package folder it wrote."""


@dataclass
class ModelPackage:
    """A package found on disk; `path` is its folder or zip file; files are read through `read_verified`."""

    name: str
    version: str
    kind: str
    path: Path
    manifest: dict
    manifest_sha256: str = ""

    @property
    def identity(self) -> str:
        """sha256 of the manifest, which pins the sha256 of every weights file: two packages with the same name and
        version but other weights or settings have different identities."""
        return self.manifest_sha256

    @property
    def files(self) -> dict[str, str]:
        """Relative path -> sha256 of every file the manifest pins."""
        return self.manifest["files"]

    @property
    def bundled(self) -> bool:
        """True for a demo package shipped with the extension rather than installed by the user."""
        return BUNDLED_MODELS.resolve() in self.path.resolve().parents

    def __str__(self) -> str:
        return f"{self.name}=={self.version} ({self.kind}, {self.path})"


def package_reference(package: ModelPackage) -> dict:
    """How a package names the one it was fine-tuned or initialised from: name, version and the sha256 of every
    file that base pins."""
    return {"name": package.name, "version": package.version, "kind": package.kind,
            "files_sha256": dict(sorted(package.files.items()))}


def timestamped_version(base: str) -> str:
    """`base+YYYYMMDD.HHMMSS` (UTC): the default version of a trained package, so that two trainings never share
    a name and version (results.csv and installs tell packages apart by content too, but people read versions)."""
    return f"{base}+{time.strftime('%Y%m%d.%H%M%S', time.gmtime())}"


def models_home() -> Path:
    """Where packages are installed: $AACSCORE_HOME/models, or ~/.aacscore/models."""
    home = os.environ.get("AACSCORE_HOME")
    base = Path(home).expanduser() if home else Path.home() / ".aacscore"
    return base / "models"


# ---------------------------------------------------------------------------------------------- manifest


def validate_manifest(manifest: Any, where: str | Path) -> dict:
    """Check the manifest schema; `where` names the package in the error. Extra fields are allowed."""
    if not isinstance(manifest, dict):
        raise ModelPackageError(f"{where}: {MANIFEST} must hold a JSON object")
    missing = [field for field in REQUIRED_FIELDS if field not in manifest]
    if missing:
        raise ModelPackageError(f"{where}: {MANIFEST} lacks the field(s) {', '.join(missing)}")
    for field, kind in REQUIRED_FIELDS.items():
        if not isinstance(manifest[field], kind):
            raise ModelPackageError(
                f"{where}: {MANIFEST} field '{field}' must be a {kind.__name__}, "
                f"not {type(manifest[field]).__name__}"
            )
    for field in ("name", "version"):
        if not _SAFE_ID.match(manifest[field]):
            raise ModelPackageError(
                f"{where}: {MANIFEST} field '{field}' is {manifest[field]!r}; use letters, digits and . _ + - only"
            )
    if manifest["kind"] not in KINDS:
        raise ModelPackageError(
            f"{where}: {MANIFEST} field 'kind' is {manifest['kind']!r}; expected one of {', '.join(KINDS)}"
        )
    if not all(isinstance(label, str) and label for label in manifest["labels"]):
        raise ModelPackageError(f"{where}: {MANIFEST} field 'labels' must be a list of non-empty names")
    if not manifest["files"]:
        raise ModelPackageError(f"{where}: {MANIFEST} lists no files")
    for relpath, digest in manifest["files"].items():
        _check_relpath(relpath, where)
        if relpath == MANIFEST:
            raise ModelPackageError(f"{where}: {MANIFEST} cannot list itself in 'files'")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise ModelPackageError(f"{where}: {relpath}: manifest sha256 {digest!r} is not 64 lowercase hex digits")
    return manifest


def _check_relpath(relpath: Any, where: str | Path) -> PurePosixPath:
    """Refuse paths that could point outside the package (absolute, '..', drive letters, backslashes)."""
    if not isinstance(relpath, str) or not relpath:
        raise ModelPackageError(f"{where}: file path {relpath!r} is not a non-empty string")
    path = PurePosixPath(relpath)
    unsafe = (
        "\\" in relpath
        or path.is_absolute()
        or ":" in path.parts[0]
        or any(part in ("..", ".", "") for part in relpath.split("/"))
    )
    if unsafe:
        raise ModelPackageError(f"{where}: {relpath!r} is not a plain relative path inside the package (refused)")
    return path


def _parse_manifest(data: bytes, where: str | Path) -> dict:
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelPackageError(f"{where}: {MANIFEST} is not valid JSON ({error})") from None
    return validate_manifest(manifest, where)


def _package(manifest: dict, path: Path, manifest_bytes: bytes = b"") -> ModelPackage:
    return ModelPackage(manifest["name"], manifest["version"], manifest["kind"], Path(path), manifest,
                        hashlib.sha256(manifest_bytes).hexdigest() if manifest_bytes else "")


def _check_seal(package: ModelPackage, seal: bytes | None) -> None:
    """Refuse a manifest changed since the package was sealed (a package without a seal is taken as it is)."""
    if seal is None:
        return
    expected = seal.decode("ascii", "replace").split()[0] if seal.strip() else ""
    if expected != package.manifest_sha256:
        raise ModelPackageError(f"{package.path}: {MANIFEST} was changed after the package was written (its sha256 "
                                f"does not match {MANIFEST_SEAL}); refused - reinstall the package")


# ---------------------------------------------------------------------------------------------- hashing


def _checksum_error(where: str | Path, relpath: str, expected: str, got: str) -> ModelPackageError:
    return ModelPackageError(
        f"{where}: {relpath}: checksum does not match the manifest (expected {expected}, got {got})"
    )


# ---------------------------------------------------------------------------------------------- zip access


def _zip_root(archive: zipfile.ZipFile, where: str | Path) -> str:
    """The prefix under which the package sits: '' or one top-level folder that holds the manifest."""
    for name in archive.namelist():
        _check_relpath(name.rstrip("/"), where)
    names = set(archive.namelist())
    if MANIFEST in names:
        return ""
    roots = sorted(name[: -len(MANIFEST)] for name in names if re.fullmatch(rf"[^/]+/{re.escape(MANIFEST)}", name))
    if len(roots) == 1:
        return roots[0]
    if roots:
        raise ModelPackageError(f"{where}: holds several packages ({', '.join(roots)}); zip one at a time")
    raise ModelPackageError(f"{where}: no {MANIFEST} at the top of the archive or in its one top-level folder")


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise ModelPackageError(f"{path}: cannot be read as a zip archive ({error})") from None


def _zip_sha256(archive: zipfile.ZipFile, member: str, where: Path) -> str:
    digest = hashlib.sha256()
    try:
        with archive.open(member) as stream:
            for chunk in iter(lambda: stream.read(_CHUNK), b""):
                digest.update(chunk)
    except (zipfile.BadZipFile, OSError) as error:
        raise ModelPackageError(f"{where}: {member}: corrupt in the archive ({error})") from None
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- reading


def read_package(path: str | Path) -> ModelPackage:
    """Read and validate a package's manifest without hashing its files (cheap: for listing and choosing)."""
    path = Path(path)
    if path.is_dir():
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise ModelPackageError(f"{path}: no {MANIFEST}; not a model package")
        data = manifest_path.read_bytes()
        return _package(_parse_manifest(data, path), path, data)
    if path.is_file():
        with _open_zip(path) as archive:
            root = _zip_root(archive, path)
            data = archive.read(root + MANIFEST)
            return _package(_parse_manifest(data, path), path, data)
    raise ModelPackageError(f"{path}: no such package folder or zip")


def _read_seal(package: ModelPackage) -> bytes | None:
    try:
        if package.path.is_dir():
            seal = package.path / MANIFEST_SEAL
            return seal.read_bytes() if seal.is_file() else None
        with _open_zip(package.path) as archive:
            name = _zip_root(archive, package.path) + MANIFEST_SEAL
            return archive.read(name) if name in archive.namelist() else None
    except (OSError, KeyError, zipfile.BadZipFile) as error:
        raise ModelPackageError(f"{package.path}: {MANIFEST_SEAL}: cannot be read ({error})") from None


def _inside(package_dir: Path, relpath: str) -> Path:
    """The file of a folder package, refused when it (or a link on its way) points outside the package."""
    file = package_dir / relpath
    if package_dir.resolve() not in file.resolve().parents:
        raise ModelPackageError(f"{package_dir}: {relpath}: links outside the package (refused)")
    return file


def verify_package(path: str | Path) -> ModelPackage:
    """Check every listed file exists and matches its sha256, and no unlisted weights or JSON lie beside them."""
    package = read_package(path)
    _check_seal(package, _read_seal(package))
    path = package.path
    if path.is_dir():
        for relpath, expected in package.files.items():
            if not (path / relpath).is_file():
                raise ModelPackageError(f"{path}: {relpath}: listed in the manifest but missing")
            got = sha256_file(_inside(path, relpath))
            if got != expected:
                raise _checksum_error(path, relpath, expected, got)
        present = {file.relative_to(path).as_posix() for file in path.rglob("*") if file.is_file()}
    else:
        with _open_zip(path) as archive:
            root = _zip_root(archive, path)
            names = set(archive.namelist())
            for relpath, expected in package.files.items():
                if root + relpath not in names:
                    raise ModelPackageError(f"{path}: {relpath}: listed in the manifest but missing")
                got = _zip_sha256(archive, root + relpath, path)
                if got != expected:
                    raise _checksum_error(path, relpath, expected, got)
            present = {name[len(root):] for name in names if name.startswith(root) and not name.endswith("/")}
    unlisted = sorted(
        relpath
        for relpath in present - set(package.files) - {MANIFEST}
        if relpath.endswith(PINNED_SUFFIXES)
    )
    if unlisted:
        raise ModelPackageError(f"{path}: {', '.join(unlisted)}: present but not listed in the manifest (refused)")
    return package


def read_verified(package: ModelPackage, relpath: str) -> bytes:
    """The bytes of one package file, after checking them against the manifest's sha256 and the manifest against
    its seal."""
    expected = package.files.get(relpath)
    if expected is None:
        raise ModelPackageError(f"{package.path}: {relpath}: not listed in the manifest")
    _check_seal(package, _read_seal(package))
    try:
        if package.path.is_dir():
            data = _inside(package.path, relpath).read_bytes()
        else:
            with _open_zip(package.path) as archive:
                data = archive.read(_zip_root(archive, package.path) + relpath)
    except (OSError, KeyError, zipfile.BadZipFile) as error:
        raise ModelPackageError(f"{package.path}: {relpath}: cannot be read ({error})") from None
    got = hashlib.sha256(data).hexdigest()
    if got != expected:
        raise _checksum_error(package.path, relpath, expected, got)
    return data


def load_safetensors(package: ModelPackage, filename: str) -> dict:
    """Load a weights file of the package as {name: tensor}; the bytes loaded are the bytes checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = read_verified(package, filename)
    try:
        return load(data)
    except SafetensorError as error:
        raise ModelPackageError(f"{package.path}: {filename}: not a valid safetensors file ({error})") from None


# ---------------------------------------------------------------------------------------------- writing


def _replace_dir(built: Path, destination: Path) -> None:
    """Move a finished folder into place; an older folder there is set aside first and removed after."""
    old = None
    if destination.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
        os.replace(destination, old / destination.name)
    try:
        os.replace(built, destination)
    except OSError:
        if old is not None:
            os.replace(old / destination.name, destination)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_package(out_dir: str | Path, manifest: dict, files: dict[str, Path | bytes]) -> ModelPackage:
    """Write a package folder: the files, then a manifest with their sha256, then rename it into place.

    `manifest` holds every field but 'files', which is computed here (a given one is replaced).
    An existing folder at `out_dir` is replaced only once the new one is complete.
    """
    out_dir = Path(out_dir)
    manifest = {**manifest, "files": {relpath: "0" * 64 for relpath in files}}
    validate_manifest(manifest, out_dir)  # refuses bad fields and unsafe paths before anything is written
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for relpath, content in files.items():
            target = build / relpath
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, (bytes, bytearray)):
                target.write_bytes(content)
            else:
                shutil.copyfile(content, target)
            manifest["files"][relpath] = sha256_file(target)
        data = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
        (build / MANIFEST).write_bytes(data)
        _write_seal(build, data)
        _replace_dir(build, out_dir)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return _package(manifest, out_dir, data)


def _write_seal(folder: Path, manifest_bytes: bytes) -> None:
    (folder / MANIFEST_SEAL).write_text(f"{hashlib.sha256(manifest_bytes).hexdigest()}  {MANIFEST}\n", "ascii")


# ---------------------------------------------------------------------------------------------- install


def _is_url(source: str) -> bool:
    return urllib.parse.urlparse(source).scheme.lower() in ("http", "https", "file")


def _download(url: str, target: Path, progress: Progress | None) -> None:
    """Fetch a URL in chunks, reporting (bytes done, total or None); raise from `progress` to cancel."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(target, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            done = 0
            if progress:
                progress(done, total)
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                out.write(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
    except OSError as error:  # URLError and HTTPError are OSErrors
        raise ModelPackageError(f"{url}: download failed ({error})") from None
    if total is not None and done != total:
        raise ModelPackageError(f"{url}: download incomplete ({done} of {total} bytes)")


def _find_nnunet_results(folder: Path) -> Path | None:
    """The one nnU-Net results folder (plans.json, dataset.json, fold_*/checkpoint_*.pth) in `folder`, if any."""
    found = sorted(
        plans.parent
        for plans in folder.rglob("plans.json")
        if (plans.parent / "dataset.json").is_file() and any(plans.parent.glob("fold_*/checkpoint_*.pth"))
    )
    if len(found) > 1:
        listed = ", ".join(str(path.relative_to(folder)) for path in found)
        raise ModelPackageError(f"{folder}: holds several nnU-Net results folders ({listed}); install one at a time")
    return found[0] if found else None


def _package_root(folder: Path, staging: Path, where: str, convert_results: ResultsConverter | None) -> Path:
    """The package inside an unpacked source: its manifest folder, or an nnU-Net results folder converted."""
    if (folder / MANIFEST).is_file():
        return folder
    subfolders = [path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("__MACOSX")]
    if len(subfolders) == 1 and (subfolders[0] / MANIFEST).is_file():
        return subfolders[0]
    results = _find_nnunet_results(folder)
    if results is None:
        raise ModelPackageError(f"{where}: no {MANIFEST} and no nnU-Net results folder; not a model package")
    if convert_results is None:
        raise ModelPackageError(f"{where}: is an nnU-Net results folder, but no converter was given to install it")
    return Path(convert_results(results, staging / "converted"))


def _same_install(destination: Path, package: ModelPackage) -> bool:
    """True when `destination` already holds this exact package intact (reinstalling is then a no-op)."""
    try:
        installed = verify_package(destination)
    except ModelPackageError:
        return False  # broken or partial: replace it
    if installed.manifest != package.manifest:
        raise ModelPackageError(
            f"{destination}: {package.name}=={package.version} is already installed with other contents; "
            f"give the new package another version, or remove that folder first"
        )
    return True


def install_package(
    source: str | Path,
    sha256: str | None = None,
    models_dir: str | Path | None = None,
    progress: Progress | None = None,
    convert_results: ResultsConverter | None = None,
) -> ModelPackage:
    """Install a package from a folder, a zip, or an http(s)/file URL into `models_dir/<name>-<version>/`.

    `convert_results(results_folder, out_dir)` turns a training framework's results folder into a package
    (models.install_model passes nnU-Net's); packages.py itself knows no framework, so it imports none.

    `sha256` pins the archive: it is checked before anything is unpacked. `progress(done, total)` is called
    while downloading (total None when unknown); raising from it cancels. Nothing is left behind on failure.
    """
    models_dir = Path(models_dir) if models_dir is not None else models_home()
    source = str(source)
    expected = sha256.strip().lower() if sha256 else None
    if expected is not None and not _SHA256.match(expected):
        raise ModelPackageError(f"sha256 {sha256!r} is not 64 hex digits")
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".install-", dir=models_dir))
    try:
        if _is_url(source):
            local = staging / "download"
            _download(source, local, progress)
        else:
            local = Path(source).expanduser()
            if not local.exists():
                raise ModelPackageError(f"{source}: no such file, folder or URL")
        if expected is not None:
            if local.is_dir():
                raise ModelPackageError(f"{source}: a sha256 pins an archive or URL, not a folder")
            got = sha256_file(local)
            if got != expected:
                raise ModelPackageError(
                    f"{source}: checksum does not match (expected {expected}, got {got}); nothing was installed"
                )
        if local.is_dir():
            unpacked = local
        else:
            unpacked = staging / "unpacked"
            with _open_zip(local) as archive:
                for name in archive.namelist():
                    _check_relpath(name.rstrip("/"), source)
                archive.extractall(unpacked)
        package = verify_package(_package_root(unpacked, staging, source, convert_results))

        destination = models_dir / f"{package.name}-{package.version}"
        if destination.exists() and _same_install(destination, package):
            return read_package(destination)
        build = staging / "build"
        for relpath in [MANIFEST, *package.files]:
            (build / relpath).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(package.path / relpath, build / relpath)
        _write_seal(build, (build / MANIFEST).read_bytes())
        verify_package(build)  # the copy, not only the source, must match the manifest
        _replace_dir(build, destination)
        return read_package(destination)
    except ModelPackageError as error:  # name the user's folder or zip, not the hidden staging folder
        message = str(error)
        for inner in (staging / "unpacked", staging / "download", staging):
            message = message.replace(str(inner), source)
        raise ModelPackageError(message) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- finding


def package_paths(models_dir: str | Path | None = None) -> list[Path]:
    """Candidate package folders, installed first, then bundled; hidden work folders are skipped."""
    models_dir = Path(models_dir) if models_dir is not None else models_home()
    paths = []
    for base in (models_dir, BUNDLED_MODELS):
        if base.is_dir():
            paths += sorted(
                path for path in base.iterdir()
                if path.is_dir() and not path.name.startswith(".") and (path / MANIFEST).is_file()
            )
    return paths


def _version_key(version: str) -> tuple:
    """Order versions numerically part by part ('1.10' after '1.9'); a text part sorts before a number."""
    parts = re.findall(r"\d+|[A-Za-z]+", version)
    return tuple((1, int(part), "") if part.isdigit() else (0, 0, part) for part in parts)


def list_packages(models_dir: str | Path | None = None) -> list[ModelPackage]:
    """Installed packages, then bundled demo ones; a folder whose manifest is invalid is left out with a warning."""
    packages = []
    for path in package_paths(models_dir):
        try:
            packages.append(read_package(path))
        except ModelPackageError as error:
            _log.warning("skipping %s", error)
    return packages


def available_text(packages: list[ModelPackage]) -> str:
    if not packages:
        return "install one with: python setup_weights.py install PATH_OR_URL"
    return "available: " + ", ".join(
        f"{p.name}=={p.version} ({p.kind}, {'bundled' if p.bundled else 'installed'})" for p in packages
    )


def find_package(
    name_or_path: str | Path | None, kind: str | None, models_dir: str | Path | None = None
) -> ModelPackage:
    """Choose a package: a folder/zip path, 'name', 'name==version', or None for the newest of `kind`.

    Installed packages win over bundled ones; among those, the highest version. `kind` None accepts any kind.
    """
    if kind is not None and kind not in KINDS:
        raise ModelPackageError(f"unknown package kind {kind!r}; expected one of {', '.join(KINDS)}")
    what = f"{kind} package" if kind else "model package"
    text = "" if name_or_path is None else str(name_or_path)
    if text and (Path(text).expanduser().exists() or os.sep in text or "/" in text or text.endswith(".zip")):
        package = read_package(Path(text).expanduser())
        if kind is not None and package.kind != kind:
            raise ModelPackageError(f"{package.path}: is a {package.kind} package, not a {kind} package")
        return package

    packages = list_packages(models_dir)
    of_kind = [p for p in packages if kind is None or p.kind == kind]
    name, _, version = text.partition("==")
    candidates = [p for p in of_kind if (not name or p.name == name) and (not version or p.version == version)]
    if not candidates:
        wanted = f"named {text!r}" if text else "installed or bundled"
        raise ModelPackageError(f"no {what} {wanted}; {available_text(of_kind)}")
    return max(candidates, key=lambda p: (not p.bundled, _version_key(p.version), p.name))
