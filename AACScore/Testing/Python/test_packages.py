"""Model packages: writing, verifying, installing (folder, zip, URL, nnU-Net hook), finding, loading, and the CLI."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import subprocess
import sys
import threading
import types
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from AACScoreLib import packages
from AACScoreLib.errors import ModelPackageError
from AACScoreLib.models import install_model
from AACScoreLib.packages import (
    find_package,
    install_package,
    list_packages,
    load_safetensors,
    models_home,
    read_package,
    verify_package,
    write_package,
)

REPO = Path(__file__).resolve().parents[3]
SHIPPED_MODELS = packages.BUNDLED_MODELS  # read before the fixture below points it elsewhere


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """Install into tmp_path/home/models and see no bundled packages but those a test puts there."""
    monkeypatch.setenv("AACSCORE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(packages, "BUNDLED_MODELS", tmp_path / "bundled")
    return tmp_path / "home" / "models"


def manifest(name="demo-scorer", version="1.0.0", kind="scorer") -> dict:
    return {
        "name": name,
        "version": version,
        "kind": kind,
        "architecture": {"type": "scse-resnet34", "subscores": False},
        "input": {"height": 8, "width": 4},
        "labels": ["aac24"],
        "training_data": {"source": "phantoms", "n": 10},
        "metrics": {"mae": 1.5},
    }


def weights(tmp_path: Path, value: float = 1.0) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = {"fc.weight": torch.full((2, 3), value), "fc.bias": torch.arange(2, dtype=torch.float32)}
    path = tmp_path / f"w{value}.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def make_package(tmp_path: Path, folder="src", value=1.0, **fields) -> packages.ModelPackage:
    path, _ = weights(tmp_path, value)
    return write_package(tmp_path / folder / "pkg", manifest(**fields), {"model.safetensors": path})


def zip_folder(folder: Path, archive: Path, prefix: str = "") -> Path:
    with zipfile.ZipFile(archive, "w") as out:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                out.write(file, prefix + file.relative_to(folder).as_posix())
    return archive


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_round_trip_write_verify_install_list_find_load(tmp_path, home):
    path, tensors = weights(tmp_path)
    written = write_package(
        tmp_path / "src" / "demo", manifest(), {"model.safetensors": path, "config/extra.json": b'{"a": 1}'}
    )
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == ["demo"]  # no work folder left beside it
    stored = json.loads((written.path / "manifest.json").read_text())
    extra_sha = hashlib.sha256(b'{"a": 1}').hexdigest()
    assert stored["files"] == {"model.safetensors": sha256(path), "config/extra.json": extra_sha}
    assert verify_package(written.path).manifest == stored

    installed = install_package(written.path)
    assert installed.path == home / "demo-scorer-1.0.0" == models_home() / "demo-scorer-1.0.0"
    assert (installed.name, installed.version, installed.kind) == ("demo-scorer", "1.0.0", "scorer")
    assert not installed.bundled
    assert [p.path for p in list_packages()] == [installed.path]
    for query in ("demo-scorer", "demo-scorer==1.0.0", None):
        assert find_package(query, "scorer").path == installed.path
    assert find_package(str(written.path), "scorer").path == written.path
    loaded = load_safetensors(find_package(None, "scorer"), "model.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)

    mtime = (installed.path / "manifest.json").stat().st_mtime_ns
    again = install_package(written.path)  # same version again: nothing changes
    assert again.path == installed.path and (installed.path / "manifest.json").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in home.iterdir()) == ["demo-scorer-1.0.0"]


def test_tampered_weights_refused_on_verify_and_load(tmp_path):
    installed = install_package(make_package(tmp_path).path)
    save_file({"fc.weight": torch.zeros(2, 3), "fc.bias": torch.zeros(2)}, str(installed.path / "model.safetensors"))
    with pytest.raises(ModelPackageError, match="model.safetensors: checksum does not match the manifest"):
        verify_package(installed.path)
    with pytest.raises(ModelPackageError, match="checksum does not match"):
        load_safetensors(installed, "model.safetensors")
    with pytest.raises(ModelPackageError, match="not listed in the manifest"):
        load_safetensors(installed, "other.safetensors")
    # Reinstalling the good package repairs the broken install.
    install_package(tmp_path / "src" / "pkg")
    assert verify_package(installed.path).name == "demo-scorer"


def test_write_package_replaces_an_existing_folder_whole(tmp_path):
    first = make_package(tmp_path, value=1.0)
    (first.path / "stale.txt").write_text("old")
    second = make_package(tmp_path, value=2.0)
    assert second.path == first.path and not (second.path / "stale.txt").exists()
    assert torch.equal(load_safetensors(second, "model.safetensors")["fc.weight"], torch.full((2, 3), 2.0))
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == ["pkg"]


def test_zip_install_checks_sha256_before_extracting(tmp_path, home):
    archive = zip_folder(make_package(tmp_path).path, tmp_path / "demo.zip", prefix="demo/")
    with pytest.raises(ModelPackageError, match="checksum does not match"):
        install_package(archive, sha256="0" * 64)
    assert not home.exists() or list(home.iterdir()) == []  # nothing installed, no work folder left
    with pytest.raises(ModelPackageError, match="not 64 hex digits"):
        install_package(archive, sha256="abc")

    assert verify_package(archive).path == archive
    from_zip = find_package(str(archive), "scorer")
    assert torch.equal(load_safetensors(from_zip, "model.safetensors")["fc.weight"], torch.ones(2, 3))
    installed = install_package(archive, sha256=sha256(archive).upper())
    assert installed.path == home / "demo-scorer-1.0.0" and verify_package(installed.path)
    assert sorted(p.name for p in installed.path.iterdir()) == ["manifest.json", "manifest.sha256", "model.safetensors"]


def test_file_url_install_reports_progress(tmp_path, home):
    archive = zip_folder(make_package(tmp_path).path, tmp_path / "demo.zip")
    calls = []
    installed = install_package(archive.as_uri(), sha256=sha256(archive), progress=lambda d, t: calls.append((d, t)))
    size = archive.stat().st_size
    assert calls[0] == (0, size) and calls[-1] == (size, size)
    assert installed.path == home / "demo-scorer-1.0.0"
    with pytest.raises(ModelPackageError, match="download failed"):
        install_package((tmp_path / "missing.zip").as_uri())


def test_http_url_install(tmp_path, home):
    archive = zip_folder(make_package(tmp_path).path, tmp_path / "demo.zip")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}"
            calls = []
            installed = install_package(f"{url}/demo.zip", progress=lambda d, t: calls.append((d, t)))
            assert calls[-1] == (archive.stat().st_size,) * 2 and installed.path == home / "demo-scorer-1.0.0"
            with pytest.raises(ModelPackageError, match="absent.zip: download failed.*404"):
                install_package(f"{url}/absent.zip")
        finally:
            server.shutdown()


def test_raising_from_progress_cancels_cleanly(tmp_path, home):
    archive = zip_folder(make_package(tmp_path).path, tmp_path / "demo.zip")

    def cancel(done, total):
        if done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        install_package(archive.as_uri(), progress=cancel)
    assert list(home.iterdir()) == []


def test_path_traversal_refused(tmp_path, home):
    package = make_package(tmp_path)
    archive = zip_folder(package.path, tmp_path / "evil.zip")
    with zipfile.ZipFile(archive, "a") as out:
        out.writestr("../evil.safetensors", b"x")
    for action in (verify_package, install_package):
        with pytest.raises(ModelPackageError, match=r"'\.\./evil\.safetensors' is not a plain relative path.*refused"):
            action(archive)
    assert not (tmp_path / "evil.safetensors").exists() and list(home.iterdir()) == []

    stored = json.loads((package.path / "manifest.json").read_text())
    for bad in ("../model.safetensors", "/etc/model.safetensors", "a\\b.safetensors", "./model.safetensors"):
        (package.path / "manifest.json").write_text(json.dumps({**stored, "files": {bad: "0" * 64}}))
        with pytest.raises(ModelPackageError, match="not a plain relative path"):
            verify_package(package.path)
    with pytest.raises(ModelPackageError, match="not a plain relative path"):
        write_package(tmp_path / "out", manifest(), {"../x.safetensors": b"x"})
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("field", [f for f in packages.REQUIRED_FIELDS if f != "files"])
def test_missing_manifest_field_named(tmp_path, field):
    broken = manifest()
    del broken[field]
    with pytest.raises(ModelPackageError, match=f"lacks the field\\(s\\) {field}$"):
        write_package(tmp_path / "out", broken, {"model.safetensors": b"x"})
    assert not (tmp_path / "out").exists()


def test_bad_manifest_values_explained(tmp_path):
    cases = [
        ({"kind": "classifier"}, "'kind' is 'classifier'; expected one of segmenter, scorer"),
        ({"labels": "aac24"}, "'labels' must be a list, not str"),
        ({"labels": [1]}, "list of non-empty names"),
        ({"name": "a b"}, "'name' is 'a b'; use letters"),
        ({"version": "1/2"}, "'version' is '1/2'"),
        ({"metrics": None}, "'metrics' must be a dict, not NoneType"),
    ]
    for change, message in cases:
        with pytest.raises(ModelPackageError, match=message):
            write_package(tmp_path / "out", {**manifest(), **change}, {"model.safetensors": b"x"})
    with pytest.raises(ModelPackageError, match="lists no files"):
        write_package(tmp_path / "out", manifest(), {})
    package = make_package(tmp_path)
    stored = json.loads((package.path / "manifest.json").read_text())
    (package.path / "manifest.json").write_text(json.dumps({**stored, "files": {"model.safetensors": "abc"}}))
    with pytest.raises(ModelPackageError, match="model.safetensors: manifest sha256 'abc' is not 64"):
        read_package(package.path)
    (package.path / "manifest.json").write_text("{not json")
    with pytest.raises(ModelPackageError, match=r"pkg: manifest.json is not valid JSON"):
        verify_package(package.path)
    with pytest.raises(ModelPackageError, match="no manifest.json; not a model package"):
        read_package(tmp_path)


def test_missing_and_unlisted_files(tmp_path):
    package = make_package(tmp_path)
    (package.path / "README.txt").write_text("notes need no pin")
    assert verify_package(package.path)
    for extra in ("other.safetensors", "sub/settings.json"):
        (package.path / extra).parent.mkdir(exist_ok=True)
        (package.path / extra).write_bytes(b"{}")
        with pytest.raises(ModelPackageError, match=f"{extra}: present but not listed in the manifest"):
            verify_package(package.path)
        (package.path / extra).unlink()
    (package.path / "model.safetensors").unlink()
    with pytest.raises(ModelPackageError, match="model.safetensors: listed in the manifest but missing"):
        verify_package(package.path)


def test_same_version_with_other_contents_refused(tmp_path, home):
    install_package(make_package(tmp_path, folder="a", value=1.0).path)
    with pytest.raises(ModelPackageError, match="already installed with other contents"):
        install_package(make_package(tmp_path, folder="b", value=2.0).path)
    kept = load_safetensors(find_package("demo-scorer", "scorer"), "model.safetensors")
    assert torch.equal(kept["fc.weight"], torch.ones(2, 3))
    assert sorted(p.name for p in home.iterdir()) == ["demo-scorer-1.0.0"]


def test_find_prefers_installed_then_newest_and_explains_misses(tmp_path):
    assert SHIPPED_MODELS == REPO / "AACScore" / "Resources" / "Models"
    with pytest.raises(ModelPackageError, match="no scorer package installed or bundled; install one with: python"):
        find_package(None, "scorer")
    bundled = make_package(tmp_path, folder="bundled", version="9.0")
    assert find_package(None, "scorer").path == bundled.path and bundled.bundled

    for version in ("1.9", "1.10", "1.2"):
        install_package(make_package(tmp_path, folder=f"v{version}", version=version).path)
    listed = [(p.version, p.bundled) for p in list_packages()]
    assert listed == [("1.10", False), ("1.2", False), ("1.9", False), ("9.0", True)]
    assert find_package(None, "scorer").version == "1.10"
    assert find_package("demo-scorer==9.0", "scorer").path == bundled.path
    assert find_package("demo-scorer==1.2", None).version == "1.2"

    with pytest.raises(ModelPackageError, match=r"no scorer package named 'nope'; available: demo-scorer==1\.10 \(sc"):
        find_package("nope", "scorer")
    with pytest.raises(ModelPackageError, match="no segmenter package named 'demo-scorer'"):
        find_package("demo-scorer", "segmenter")
    with pytest.raises(ModelPackageError, match="is a scorer package, not a segmenter package"):
        find_package(str(bundled.path), "segmenter")
    with pytest.raises(ModelPackageError, match="no such package folder or zip"):
        find_package(str(tmp_path / "absent"), "scorer")


def test_broken_manifest_skipped_in_list(tmp_path, home, caplog):
    install_package(make_package(tmp_path).path)
    (home / "junk").mkdir()
    (home / "junk" / "manifest.json").write_text("[]")
    assert [p.name for p in list_packages()] == ["demo-scorer"]
    assert "junk: manifest.json must hold a JSON object" in caplog.text


def nnunet_results(folder: Path) -> Path:
    results = folder / "Dataset001_Lumbar" / "nnUNetTrainer__nnUNetPlans__2d"
    (results / "fold_0").mkdir(parents=True)
    (results / "plans.json").write_text("{}")
    (results / "dataset.json").write_text("{}")
    (results / "fold_0" / "checkpoint_final.pth").write_bytes(b"not loaded here")
    return results


def test_nnunet_results_go_through_the_converter_hook(tmp_path, home, monkeypatch):
    results = nnunet_results(tmp_path / "nnunet")
    monkeypatch.setitem(sys.modules, "AACScoreLib.segmentation.package", None)  # as if the module were absent
    with pytest.raises(ModelPackageError, match="nnU-Net results folder, but conversion is unavailable"):
        install_model(tmp_path / "nnunet")

    seen = []

    def convert_nnunet_results(src, out_dir):
        seen.append(Path(src))
        path, _ = weights(tmp_path)
        return write_package(out_dir, manifest("lumbar-seg", "0.1", "segmenter"), {"model.safetensors": path}).path

    stub = types.ModuleType("AACScoreLib.segmentation.package")
    stub.convert_nnunet_results = convert_nnunet_results
    monkeypatch.setitem(sys.modules, "AACScoreLib.segmentation.package", stub)
    installed = install_model(tmp_path / "nnunet")
    assert seen == [results] and installed.kind == "segmenter" and installed.path == home / "lumbar-seg-0.1"
    archive = zip_folder(tmp_path / "nnunet", tmp_path / "export.zip")  # as nnUNetv2_export_model_to_zip nests it
    assert install_model(archive).path == installed.path
    assert seen[-1].relative_to(seen[-1].parents[1]) == Path("Dataset001_Lumbar/nnUNetTrainer__nnUNetPlans__2d")
    assert sorted(p.name for p in home.iterdir()) == ["lumbar-seg-0.1"]

    (results.parent / "other_config").mkdir()
    for name in ("plans.json", "dataset.json"):
        (results.parent / "other_config" / name).write_text("{}")
    (results.parent / "other_config" / "fold_1").mkdir()
    (results.parent / "other_config" / "fold_1" / "checkpoint_best.pth").write_bytes(b"")
    with pytest.raises(ModelPackageError, match="several nnU-Net results folders"):
        install_model(tmp_path / "nnunet")
    with pytest.raises(ModelPackageError, match="no manifest.json and no nnU-Net results folder"):
        install_model(tmp_path / "nnunet" / "Dataset001_Lumbar" / "nnUNetTrainer__nnUNetPlans__2d" / "fold_0")


def test_models_home(monkeypatch, tmp_path):
    assert models_home() == tmp_path / "home" / "models"
    monkeypatch.delenv("AACSCORE_HOME")
    assert models_home() == Path.home() / ".aacscore" / "models"


def run_cli(*args, python_flags=()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *python_flags, str(REPO / "setup_weights.py"), *args],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )


def test_setup_weights_cli(tmp_path, home):
    archive = zip_folder(make_package(tmp_path).path, tmp_path / "demo.zip")
    wrong = run_cli("install", str(archive), "--sha256", "f" * 64)
    assert wrong.returncode == 2 and "checksum does not match" in wrong.stderr and list(home.iterdir()) == []

    done = run_cli("install", str(archive), "--sha256", sha256(archive))
    assert done.returncode == 0, done.stderr
    assert f"installed demo-scorer==1.0.0 (scorer) in {home / 'demo-scorer-1.0.0'}" in done.stdout

    # Without site-packages AACScoreLib is not installed: the script must find it beside itself.
    listing = run_cli("list", python_flags=("-S",))
    assert listing.returncode == 0, listing.stderr
    header, row = listing.stdout.splitlines()[:2]
    assert header.split() == ["NAME", "VERSION", "KIND", "SOURCE", "PATH"]
    assert row.split() == ["demo-scorer", "1.0.0", "scorer", "installed", str(home / "demo-scorer-1.0.0")]

    ok = run_cli("verify", "demo-scorer")
    assert ok.returncode == 0 and ok.stdout.splitlines()[1].split() == ["demo-scorer", "1.0.0", "scorer", "ok"]
    (home / "demo-scorer-1.0.0" / "model.safetensors").write_bytes(b"tampered")
    failed = run_cli("verify")
    assert failed.returncode == 1
    assert failed.stdout.splitlines()[1].split()[:4] == ["demo-scorer", "1.0.0", "scorer", "FAILED:"]
    assert "model.safetensors: checksum does not match the manifest" in failed.stdout
    missing = run_cli("verify", "nope", "--models-dir", str(tmp_path / "elsewhere"))
    assert missing.returncode == 2 and "no model package named 'nope'" in missing.stderr
