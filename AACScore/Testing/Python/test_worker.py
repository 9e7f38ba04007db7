"""The worker process and its protocol, for real: start it, score a bundled sample with the demo models, read
the outputs into slicer-core's scene, cancel a batch mid-way, kill a job that does not stop, see a crashed
worker reported, and install a model package in it."""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np
import pytest
import slicer.util

from AACScoreLib.io.radiograph import Radiograph
from AACScoreLib.pipeline import AACResult
from AACScoreLib.slicer import scene as aac_scene
from AACScoreLib.slicer.sample_data import SAMPLE_DATA_DIR, SAMPLE_SHA256
from AACScoreLib.slicer.workflow import JobPoller, Workflow
from AACScoreLib.worker.client import WorkerClient, WorkerError, worker_python
from AACScoreLib.worker.protocol import VolumeImage, decode, encode, result_from_message, result_message
from AACScoreLib.worker.server import write_nrrd

SAMPLES = [SAMPLE_DATA_DIR / name for name in sorted(SAMPLE_SHA256)]


@pytest.fixture(scope="module")
def client():
    worker = WorkerClient(python=sys.executable)
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def no_installed_models(tmp_path_factory):
    return tmp_path_factory.mktemp("no-installed-models")


@pytest.fixture
def workflow(client, no_installed_models):
    flow = Workflow(aac_scene.new_scene(), worker=client)
    flow.configure(None, None, "cpu", models_dir=no_installed_models)  # the bundled demo models, loaded once
    return flow


def _read_nrrd(path):
    import nrrd

    return nrrd.read(path, index_order="C")[0]


# ----------------------------------------------------------------------------------------------- protocol


def test_messages_are_single_lines_and_other_output_is_not_a_message():
    line = encode({"job": "1", "event": "progress", "text": "two\nlines", "fraction": np.float32(0.5)})
    assert line.count("\n") == 1 and decode(line)["text"] == "two\nlines"
    assert decode("Using the CPU. nnU-Net says hello\n") is None and decode("[1, 2]") is None


def test_an_image_without_a_file_travels_as_exact_voxels_with_its_spacing(tmp_path):
    pixels = np.arange(40 * 30, dtype=np.float32).reshape(40, 30)
    image = VolumeImage("/data/a.dcm", "a", (40, 30), None,
                        Radiograph(pixels=pixels, spacing=(0.2, 0.3), spacing_source="PixelSpacing", path="/data/a.dcm",
                                   format="volume", patient_orientation=("A", "F")))
    loaded = VolumeImage.from_message(decode(encode(image.to_message(tmp_path, "in")))).load()
    np.testing.assert_array_equal(loaded.pixels, pixels)
    assert loaded.spacing == (0.2, 0.3) and loaded.patient_orientation == ("A", "F") and loaded.path == "/data/a.dcm"


def test_a_result_round_trips_through_json_and_nrrd(tmp_path):
    labels = np.zeros((40, 30), np.uint8)
    labels[5:10, 5:10] = 3
    heat = np.linspace(0, 1, 1200, dtype=np.float32).reshape(40, 30)
    result = AACResult(file="a.dcm", status="warning", message="check", aac24=7.25, category="moderate",
                       subscores={c: 1.0 for c in ("L1A", "L1P", "L2A", "L2P", "L3A", "L3P", "L4A", "L4P")},
                       labels=labels, labels_source="user", heatmap=heat)
    result.context = np.where(labels == 3, 0, 6).astype(np.uint8)
    message = decode(encode(result_message(result, tmp_path, "x", write_nrrd)))
    back, record = result_from_message(message, _read_nrrd)
    np.testing.assert_array_equal(back.labels, labels)
    np.testing.assert_array_equal(back.context, result.context)
    np.testing.assert_array_equal(back.heatmap, heat)
    assert (back.aac24, back.status, back.message, back.labels_source) == (7.25, "warning", "check", "user")
    assert record["aac24"] == 7.25 and back.subscores["L4P"] == 1.0


# ----------------------------------------------------------------------------------------------- the real worker


def test_probe_runs_in_the_worker_process(client):
    answer = client.submit("probe", {"device": "cpu"}).run(120)
    assert answer["device"] == "cpu" and answer["torch"] and answer["python"]
    assert client.ready["pid"] == client.pid != os.getpid()


def test_score_a_sample_in_the_worker_and_read_the_outputs_into_the_scene(workflow):
    (volume,), problems = workflow.load_radiographs([SAMPLES[0]])
    assert not problems
    outcome = workflow.score(volume)
    assert outcome.result.status in ("ok", "warning"), outcome.result.message
    assert 0.0 <= outcome.result.aac24 <= 24.0
    (row,) = aac_scene.result_rows(workflow.results_table(), "model")
    assert row["file"] == str(SAMPLES[0]) and row["aac24"] == pytest.approx(outcome.result.aac24, abs=1e-3)
    segmentation = aac_scene.find_vertebra_segmentation(workflow.scene, volume)
    labels = aac_scene.read_vertebra_labels(segmentation, volume)
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4, 5}
    # the demo segmenter has context classes: T12 and S1 travel from the worker as hidden segments
    context = aac_scene.context_segment_ids(segmentation)
    assert context and not any(segmentation.GetDisplayNode().GetSegmentVisibility(i) for i in context)
    heat = slicer.util.arrayFromVolume(outcome.heatmap)
    assert heat.shape == slicer.util.arrayFromVolume(volume).shape and 0.0 <= heat.min() <= heat.max() <= 1.0
    assert len(outcome.boundary_lines) == 5

    # the models stay loaded: the next job does not load them again, and gives the same score
    job = workflow.start_score(workflow.prepare_score(volume), heatmap=False)
    result, record = job.run(120)
    assert not job.loaded_models and result.aac24 == pytest.approx(outcome.result.aac24, abs=1e-3)
    # no scratch node is left in the scene, and the job folder is gone
    assert not [n for n in slicer.util.getNodes("AACScore temporary*").values()]
    assert not job.folder.exists()


def test_cancel_a_batch_mid_way(workflow):
    volumes, _ = workflow.load_radiographs(SAMPLES)
    requests, problems = workflow.prepare_batch(volumes)
    assert not problems
    job = workflow.start_batch(requests * 3)  # nine radiographs
    applied = []
    poller = JobPoller(job, lambda item: applied.append(workflow.apply_score(*item)))
    deadline = time.monotonic() + 300
    cancelled_at = None
    while not poller.poll() and time.monotonic() < deadline:
        if applied and cancelled_at is None:
            job.cancel()
            cancelled_at = time.monotonic()
        time.sleep(0.02)
    assert cancelled_at is not None and poller.done
    assert time.monotonic() - cancelled_at < 2.0
    assert job.cancelled and job.error is None and not poller.problems
    assert 1 <= len(applied) < 9
    assert len(aac_scene.result_rows(workflow.results_table(), "model")) == len({id(r) for r in requests[:len(applied)]})


def test_cancel_kills_a_job_that_does_not_stop_and_the_next_job_starts_a_new_worker():
    worker = WorkerClient(python=sys.executable, cancel_grace=0.0)
    try:
        job = worker.submit("probe", {"device": "cpu"})  # importing torch: nothing to interrupt cooperatively
        queued = worker.submit("probe", {"device": "cpu"})
        first = worker.pid
        start = time.monotonic()
        job.cancel()
        assert job.wait(5) and time.monotonic() - start < 2.0
        assert job.cancelled and job.error is None
        assert queued.wait(5) and "stopped to cancel another job" in str(queued.error)
        answer = worker.submit("train")  # any job: a new worker answers it
        assert answer.wait(60) and "unknown job kind" in str(answer.error)
        assert worker.pid != first
    finally:
        worker.stop()


def test_a_worker_that_dies_is_reported_and_replaced():
    worker = WorkerClient(python=sys.executable)
    try:
        job = worker.submit("probe", {"device": "cpu"})
        first = worker.pid
        os.kill(first, signal.SIGKILL)
        assert job.wait(10)
        assert isinstance(job.error, WorkerError) and not job.cancelled
        assert str(job.error) == "the worker process ended unexpectedly (exit code -9)"
        assert "AACScoreLib.worker.server" in job.error.details
        answer = worker.submit("train")  # a fresh worker takes the next job
        assert answer.wait(60) and "unknown job kind" in str(answer.error) and worker.pid != first
    finally:
        worker.stop()


def test_a_torch_that_cannot_load_is_reported_by_the_probe_not_raised(tmp_path):
    broken = tmp_path / "torch"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise OSError('[WinError 126] The specified module could not be found')\n")
    worker = WorkerClient(python=sys.executable, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    try:
        answer = worker.submit("probe", {"device": "auto"}).run(60)
        assert answer["device"] is None and answer["torch"] is None
        assert answer["message"].startswith("PyTorch cannot be used here: OSError: [WinError 126]")
    finally:
        worker.stop()


def test_an_unknown_job_and_a_failing_job_come_back_as_errors(client, tmp_path):
    job = client.submit("train")
    assert job.wait(60) and "unknown job kind 'train'" in str(job.error)
    failed = client.submit("install_model", {"path": str(tmp_path / "missing.zip"),
                                             "models_dir": str(tmp_path / "models")})
    assert failed.wait(60) and "missing.zip: no such file" in str(failed.error)


def test_install_a_model_package_in_the_worker(workflow, tmp_path):
    models_dir = tmp_path / "models"
    workflow.configure(None, None, "cpu", models_dir=models_dir)
    package = workflow.start_install_model(aac_scene.TERMINOLOGY_FILE.parents[0] / "Models"
                                           / "aacscore-demo-scorer").run(120)
    assert package["kind"] == "scorer" and (models_dir / f"{package['name']}-{package['version']}").is_dir()


def test_score_files_without_loading_them_as_volumes(workflow):
    requests = workflow.prepare_files([SAMPLES[1]])
    job = workflow.start_batch(requests, heatmap=False)
    poller = JobPoller(job, lambda item: workflow.apply_score(*item))
    deadline = time.monotonic() + 120
    while not poller.poll() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job.error is None and not poller.problems
    (row,) = aac_scene.result_rows(workflow.results_table(), "model")
    assert row["file"] == str(SAMPLES[1]) and row["aac24"] is not None
    assert workflow.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0
    assert workflow.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_the_worker_python_is_the_configured_one_else_pythonslicer_else_this_one(monkeypatch, tmp_path):
    assert worker_python("/opt/env/bin/python") == "/opt/env/bin/python"
    monkeypatch.setenv("PATH", "")
    assert worker_python() == sys.executable  # no PythonSlicer anywhere: scripts and tests use their own Python
    launcher = tmp_path / "PythonSlicer"
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert worker_python() == str(launcher)


def test_the_panel_side_never_imports_torch_or_nnunet(tmp_path):
    """What runs in Slicer's process (scene, workflow, dependency check, worker client, reading a radiograph)
    imports none of the heavy packages: only the worker does."""
    import subprocess

    script = f"""
import sys
from AACScoreLib.slicer import dependencies, scene, workflow
from AACScoreLib.worker.client import WorkerClient
flow = workflow.Workflow(scene.new_scene(), worker=WorkerClient({sys.executable!r}))
volumes, problems = flow.load_radiographs([{str(SAMPLES[0])!r}])
dependencies.missing_requirements()
print(flow.start_probe().run(120)["torch"])
flow.worker.stop()
heavy = sorted(name for name in ("torch", "torchvision", "nnunetv2", "pytorch_grad_cam", "skimage", "matplotlib")
               if name in sys.modules)
print("heavy:", heavy)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(SAMPLE_DATA_DIR.parents[1])})
    assert run.returncode == 0, run.stderr[-2000:]
    torch_in_worker, heavy = run.stdout.strip().splitlines()[-2:]
    assert torch_in_worker.startswith("2.") and heavy == "heavy: []"


def test_fine_tuning_runs_in_the_worker_and_can_be_cancelled(workflow, tiny_scorer_package, tmp_path):
    from AACScoreLib.io.training_set import TrainingSet
    from AACScoreLib.packages import read_package
    from AACScoreLib.phantoms.generator import generate_phantom, read_back

    dataset = TrainingSet(tmp_path / "set")
    for index in range(3):
        phantom = generate_phantom(8700, "alt", index, size_range=(300, 360))
        dataset.add(read_back(phantom), phantom.labels, phantom.truth["subscores"])
    settings = {"epochs": 2, "batch": 2, "device": "cpu"}
    result = workflow.start_finetune("scorer", dataset.folder, tmp_path / "tuned", str(tiny_scorer_package.path),
                                     settings).run(180)
    assert result["kind"] == "scorer" and read_package(result["path"]).manifest["training_data"]["n_cases"] == 3
    with pytest.raises(WorkerError, match="5-fold cross-validation needs .* 10 or more rated cases .it has 3."):
        workflow.start_finetune("scorer", dataset.folder, tmp_path / "calibrated", str(tiny_scorer_package.path),
                                settings, calibrate_qc=True).run(60)  # the Slicer checkbox reaches the worker
    job = workflow.start_finetune("scorer", dataset.folder, tmp_path / "never", str(tiny_scorer_package.path),
                                  {**settings, "epochs": 500})
    deadline = time.monotonic() + 120
    while "epoch" not in job.poll()[1] and time.monotonic() < deadline:
        time.sleep(0.05)
    cancelled_at = time.monotonic()
    job.cancel()
    assert job.wait(10) and job.cancelled and time.monotonic() - cancelled_at < 2.5
    assert not (tmp_path / "never").exists()
