"""From corrected cases to a model: the training set on disk, fine-tuning both models, cross-validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from AACScoreLib.cli import main as cli_main
from AACScoreLib.errors import AACScoreError, ModelPackageError
from AACScoreLib.finetune import (ScorerFinetuneSettings, SegmenterFinetuneSettings, crossval, finetune_scorer,
                                  finetune_segmenter, fold_of_cases, levels_right, segment_cases)
from AACScoreLib.io.radiograph import Radiograph, read_radiograph
from AACScoreLib.io.training_set import TrainingSet, parse_scores
from AACScoreLib.kauppila import SUBSCORE_COLUMNS
from AACScoreLib.packages import load_safetensors, read_package, verify_package
from AACScoreLib.phantoms.generator import generate_phantom, read_back, write_phantom
from test_segmenter import toy_spine

SMALL = (300, 360)


def phantom_case(seed: int, index: int):
    phantom = generate_phantom(seed, "alt", index, size_range=SMALL)
    return phantom, read_back(phantom, f"/cohort/{phantom.name}.dcm"), phantom.truth["subscores"]


@pytest.fixture(scope="module")
def scored_set(tmp_path_factory):
    """A training set of four small phantoms with their drawn label maps and true subscores."""
    dataset = TrainingSet(tmp_path_factory.mktemp("trainingset") / "set")
    for index in range(4):
        phantom, radiograph, scores = phantom_case(8200, index)
        dataset.add(radiograph, phantom.labels, scores)
    return dataset


# ---------------------------------------------------------------------------------------------- training set


def test_training_set_is_an_nnunet_raw_dataset_and_a_train_scorer_csv(scored_set):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from AACScoreLib.scoring.data import read_score_csv

    description = json.loads((scored_set.folder / "dataset.json").read_text())
    assert description["numTraining"] == 4 and description["file_ending"] == ".nrrd"
    assert description["labels"] == {"background": 0, "L1": 1, "L2": 2, "L3": 3, "L4": 4, "L5": 5}
    case = scored_set.cases()[0]
    image, properties = SimpleITKIO().read_images([str(case.image)])  # nnU-Net's own reader
    seg, _ = SimpleITKIO().read_seg(str(case.labels))
    assert image.shape[-2:] == seg.shape[-2:] and set(np.unique(seg)) == {0, 1, 2, 3, 4, 5}
    radiograph = read_radiograph(case.image)
    assert radiograph.spacing is not None and radiograph.spacing_source == "NRRD space directions"
    records = read_score_csv(scored_set.folder / "scores.csv")
    assert len(records) == 4 and all(record.image.is_file() and record.labels.is_file() for record in records)
    assert all(record.aac24 == sum(record.subscores) for record in records)


def test_adding_the_same_radiograph_again_updates_it_instead_of_duplicating(tmp_path):
    phantom, radiograph, scores = phantom_case(8201, 0)
    dataset = TrainingSet(tmp_path / "set")
    first = dataset.add(radiograph, phantom.labels)
    assert dataset.counts() == {"cases": 1, "scored": 0} and first.scores is None
    again = dataset.add(radiograph, phantom.labels, scores)
    assert again.case == first.case and dataset.counts() == {"cases": 1, "scored": 1}
    assert again.scores == scores


def test_stored_copies_keep_no_dicom_header(tmp_path):
    phantom, _, scores = phantom_case(8202, 0)
    dicom = write_phantom(phantom, tmp_path / "in")
    import pydicom

    dataset = pydicom.dcmread(dicom)
    dataset.PatientName, dataset.PatientID = "Doe^Jane", "MRN-4711"
    dataset.save_as(dicom)
    assert cli_main(["dataset", "add", str(dicom), "--labels", str(tmp_path / "in" / f"{phantom.name}_labels.png"),
                     "--scores", ",".join(f"{k}={v}" for k, v in scores.items()), "--data", str(tmp_path / "set")]) == 0
    stored = b"".join(path.read_bytes() for path in (tmp_path / "set").rglob("*") if path.is_file())
    assert b"Doe" not in stored and b"MRN-4711" not in stored and str(tmp_path / "in").encode() not in stored


@pytest.mark.parametrize("text, message", [
    ("L1A=0,L1P=1", "missing L2A"),
    ("L1A=4," + ",".join(f"{c}=0" for c in SUBSCORE_COLUMNS[1:]), "must be 0, 1, 2 or 3"),
    ("L1A=x," + ",".join(f"{c}=0" for c in SUBSCORE_COLUMNS[1:]), "not a number"),
    ("L9A=1", "not NAME=VALUE"),
    ("L1A=1,L1A=2", "given twice"),
])
def test_scores_are_checked(text, message):
    with pytest.raises(AACScoreError, match=message):
        parse_scores(text)


def test_bad_cases_are_refused_with_nothing_written(tmp_path):
    phantom, radiograph, _ = phantom_case(8203, 0)
    dataset = TrainingSet(tmp_path / "set")
    no_l5 = np.where(phantom.labels == 5, 0, phantom.labels)
    with pytest.raises(AACScoreError, match="lacks L5"):
        dataset.add(radiograph, no_l5)
    with pytest.raises(AACScoreError, match="does not match the radiograph"):
        dataset.add(radiograph, phantom.labels[:-1])
    unknown = Radiograph(radiograph.pixels, None, "unknown", "/x/image.png", "PNG")
    with pytest.raises(AACScoreError, match="image.png: pixel spacing unknown"):
        dataset.add(unknown, phantom.labels)
    assert dataset.counts() == {"cases": 0, "scored": 0}


def test_training_set_keeps_t12_and_s1_where_drawn(tmp_path):
    import nrrd

    dataset = TrainingSet(tmp_path / "set")
    pixels, labels = toy_spine(0)
    radiograph = Radiograph(pixels.astype(np.float32), (1.25, 1.25), "test", "toy0.nrrd", "NRRD")
    with pytest.raises(AACScoreError, match=r"toy0.nrrd: the label map holds values \[9\]"):
        dataset.add(radiograph, np.where(labels == 7, 9, labels).astype(np.uint8))
    assert not (tmp_path / "set" / "cases.csv").exists()
    dataset.add(Radiograph(pixels[::-1].astype(np.float32), (1.25, 1.25), "test", "flipped.nrrd", "NRRD"),
                np.where(labels[::-1] > 5, 0, labels[::-1]))
    assert json.loads((dataset.folder / "dataset.json").read_text())["labels"] == {
        "background": 0, "L1": 1, "L2": 2, "L3": 3, "L4": 4, "L5": 5}
    case = dataset.add(radiograph, labels)
    assert case.context == ("T12", "S1")
    assert [c.context for c in dataset.cases()].count(()) == 1
    stored, _ = nrrd.read(str(case.labels), index_order="C")
    assert np.array_equal(stored, labels)
    assert json.loads((dataset.folder / "dataset.json").read_text())["labels"] == {
        "background": 0, "L1": 1, "L2": 2, "L3": 3, "L4": 4, "L5": 5, "T12": 6, "S1": 7}


# ---------------------------------------------------------------------------------------------- scorer


def test_scorer_finetuning_starts_from_the_base_and_keeps_frozen_stages(scored_set, tiny_scorer_package, tmp_path):
    from AACScoreLib.scoring.scorer import Scorer

    settings = ScorerFinetuneSettings(epochs=1, batch=4, device="cpu")
    package = finetune_scorer(scored_set.folder, tmp_path / "tuned", tiny_scorer_package, settings, log=lambda _: None)
    tuned = verify_package(package)
    base = load_safetensors(tiny_scorer_package, "weights.safetensors")
    after = load_safetensors(tuned, "weights.safetensors")
    frozen = [k for k in base if k.startswith(("backbone.conv1.", "backbone.bn1.", "backbone.layer1."))]
    assert frozen and all(torch.equal(base[k], after[k]) for k in frozen)
    assert any(not torch.equal(base[k], after[k]) for k in base if k.startswith("backbone.layer4."))
    statistics = [k for k in base if k.endswith(("running_mean", "running_var"))]
    assert statistics and all(torch.equal(base[k], after[k]) for k in statistics)  # BatchNorm statistics kept
    data = tuned.manifest["training_data"]
    assert data["fine_tuned_from"]["files_sha256"] == tiny_scorer_package.files
    assert data["training_set_sha256"] == scored_set.fingerprint() and data["n_cases"] == 4
    assert data["batchnorm_statistics"] == "kept" and data["n_cases_for_statistics"] == 0  # adaptation is opt-in
    assert tuned.manifest["metrics"]["training_cases"]["n"] == 4
    assert Scorer.from_package(package).input_size == (64, 32)


def test_train_scorer_can_start_from_a_package(tiny_scorer_package, tmp_path):
    from AACScoreLib.scoring.scorer import Scorer
    from AACScoreLib.scoring.training import TrainSettings, starting_weights

    settings = TrainSettings(input_size=(64, 32), backbone="resnet18", subscores_head=True)
    weights, reference = starting_weights(str(tiny_scorer_package.path), settings)
    assert reference["files_sha256"] == tiny_scorer_package.files and "backbone.conv1.weight" in weights
    with pytest.raises(AACScoreError, match="another network: backbone resnet18 .asked: resnet34.; subscore head"):
        starting_weights(str(tiny_scorer_package.path), TrainSettings(backbone="resnet34"))
    finer, _ = starting_weights(str(tiny_scorer_package.path), TrainSettings(input_size=(96, 48), backbone="resnet18",
                                                                            subscores_head=True))
    assert finer.keys() == weights.keys()  # a convolutional backbone with global pooling serves any input size
    out = tmp_path / "widened"  # and carried to a finer input than the base's 64x32
    assert cli_main(["train-scorer", "--synthetic", "4", "--input-size", "96x48", "--backbone", "resnet18",
                     "--subscores-head", "--epochs", "1", "--batch", "2", "--lr", "0", "--val-fraction", "0",
                     "--threads", "1", "--init-from", str(tiny_scorer_package.path), "--out", str(out)]) == 0
    trained = verify_package(out)
    assert trained.manifest["training_data"]["initialised_from"]["name"] == "tiny-scorer"
    assert trained.manifest["input"]["size"] == [96, 48] and Scorer.from_package(out).input_size == (96, 48)
    after = load_safetensors(trained, "weights.safetensors")  # learning rate 0: the base's weights, unchanged
    assert all(torch.equal(weights[k], after[k]) for k in weights if k.endswith("conv1.weight"))


def test_scorer_finetuning_needs_rated_cases(tmp_path, tiny_scorer_package):
    phantom, radiograph, _ = phantom_case(8204, 0)
    dataset = TrainingSet(tmp_path / "set")
    dataset.add(radiograph, phantom.labels)
    with pytest.raises(AACScoreError, match="0 case.s. with scores"):
        finetune_scorer(dataset.folder, tmp_path / "out", tiny_scorer_package)


def test_batchnorm_adaptation_re_estimates_the_backbones_statistics_only(tiny_scorer_package):
    from AACScoreLib.scoring.model import INPUT_MEAN, INPUT_STD, adapt_batchnorm, model_from_state

    architecture = tiny_scorer_package.manifest["architecture"]
    base = load_safetensors(tiny_scorer_package, architecture["weights"])
    model = model_from_state(architecture, base)
    crops = torch.rand(20, 1, 64, 32, generator=torch.Generator().manual_seed(0)) * 0.2 + 0.7  # a bright, flat look
    adapt_batchnorm(model, crops, batch=10)
    with torch.no_grad():  # the stem's statistics are now those of its input over these crops
        stem_input = model.backbone.conv1((crops - INPUT_MEAN) / INPUT_STD)
    assert torch.allclose(model.backbone.bn1.running_mean, stem_input.mean((0, 2, 3)), atol=1e-4)
    after = model.state_dict()
    changed = {k for k in base if not torch.equal(base[k].float(), after[k].float())}
    assert changed and all(k.startswith("backbone.") and k.endswith(("running_mean", "running_var",
                                                                     "num_batches_tracked")) for k in changed)
    assert not model.training and model.backbone.bn1.momentum == 0.1  # eval mode, momentum as it was


def test_scorer_adaptation_uses_every_case_and_needs_no_scores(tmp_path, tiny_scorer_package):
    dataset = TrainingSet(tmp_path / "set")
    for index in range(10):  # two rated cases, eight only segmented
        phantom, radiograph, scores = phantom_case(8210, index)
        dataset.add(radiograph, phantom.labels, scores if index < 2 else None)
    base = str(tiny_scorer_package.path)
    assert cli_main(["finetune", "scorer", "--data", str(dataset.folder), "--from", base, "--epochs", "0",
                     "--adapt-batchnorm", "--device", "cpu", "--out", str(tmp_path / "adapted")]) == 0
    adapted = verify_package(tmp_path / "adapted")
    assert adapted.manifest["training_data"]["batchnorm_statistics"] == "adapted to 10 cases"
    before, after = (load_safetensors(package, "weights.safetensors") for package in (tiny_scorer_package, adapted))
    statistics = {k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert all(torch.equal(before[k], after[k]) for k in before if k not in statistics)
    assert not torch.equal(before["backbone.bn1.running_mean"], after["backbone.bn1.running_mean"])

    tuned = finetune_scorer(dataset.folder, tmp_path / "tuned", base,
                            ScorerFinetuneSettings(epochs=1, batch=2, adapt_batchnorm=True, device="cpu"),
                            log=lambda _: None)
    data = read_package(tuned).manifest["training_data"]
    assert data["batchnorm_statistics"] == "adapted to 10 cases, then kept" and data["n_cases"] == 2
    assert data["n_cases_for_statistics"] == 10
    few = dataset.cases()[:9]
    with pytest.raises(AACScoreError, match="needs 10 or more cases .it has 9."):
        finetune_scorer(dataset.folder, tmp_path / "few", base, ScorerFinetuneSettings(epochs=0, adapt_batchnorm=True),
                        cases=few)
    with pytest.raises(AACScoreError, match="0 epochs would leave the scorer as it is"):
        finetune_scorer(dataset.folder, tmp_path / "same", base, ScorerFinetuneSettings(epochs=0))


def test_finetuned_scorer_is_calibrated_for_qc_by_cross_validation_when_asked(tmp_path, tiny_scorer_package):
    from AACScoreLib.pipeline import Pipeline
    from AACScoreLib.qc.reference import QC_FILE
    from AACScoreLib.scoring.scorer import Scorer

    dataset = TrainingSet(tmp_path / "set")
    for index in range(10):
        phantom, radiograph, scores = phantom_case(8220, index)
        dataset.add(radiograph, phantom.labels, scores)
    settings = ScorerFinetuneSettings(epochs=1, batch=4, device="cpu", qc_folds=2)
    lines = []
    package = finetune_scorer(dataset.folder, tmp_path / "tuned", tiny_scorer_package, settings, log=lines.append)
    assert [line for line in lines if line.startswith("QC calibration, fold")] == [
        "QC calibration, fold 1/2: fine-tuning on 5 cases, scoring 5",
        "QC calibration, fold 2/2: fine-tuning on 5 cases, scoring 5"]
    tuned = verify_package(package)  # qc.json is pinned by the manifest
    calibration = json.loads((Path(package) / QC_FILE).read_text())
    measured_on = calibration["calibration_set"]
    assert measured_on["n"] == 10 and "2-fold cross-validation" in measured_on["source"]
    assert calibration["scorer"] == f"{tuned.name}=={tuned.version}"
    case = dataset.cases()[0]
    result = Pipeline(Scorer.from_package(package), None).run(case.image, case.labels, heatmap=False)
    assert result.aac24_low is not None and result.aac24_low <= result.aac24 <= result.aac24_high

    plain = finetune_scorer(dataset.folder, tmp_path / "plain", tiny_scorer_package,
                            ScorerFinetuneSettings(epochs=1, batch=4, device="cpu"), log=lines.append)
    assert QC_FILE not in read_package(plain).files and "--qc-folds 5 calibrates it" in lines[-1]
    with pytest.raises(AACScoreError, match="needs 2 or more folds and 10 or more rated cases .it has 9."):
        finetune_scorer(dataset.folder, tmp_path / "few", tiny_scorer_package, settings, cases=dataset.cases()[:9])


def test_segmenter_finetuning_needs_an_epoch(scored_set, tmp_path):
    with pytest.raises(AACScoreError, match="needs 1 epoch or more, got 0"):
        finetune_segmenter(scored_set.folder, tmp_path / "out", None, SegmenterFinetuneSettings(epochs=0))


def test_crossval_of_the_scorer_writes_the_papers_statistics(scored_set, tiny_scorer_package, tmp_path):
    settings = ScorerFinetuneSettings(epochs=1, batch=2, device="cpu")
    results = crossval("scorer", scored_set.folder, tmp_path / "cv", folds=2, base=str(tiny_scorer_package.path),
                       scorer_settings=settings, log=lambda _: None)
    assert results["n"] == 4 and "mae" in results["metrics"] and (tmp_path / "cv" / "report.md").is_file()
    predictions = (tmp_path / "cv" / "predictions.csv").read_text()
    assert predictions.count("\n") == 5 and "fold" in predictions.splitlines()[0]


def test_folds_are_balanced_and_seeded():
    cases = list(range(7))
    folds = fold_of_cases(cases, 3, seed=1)
    assert sorted(np.bincount(folds).tolist()) == [2, 2, 3] and folds == fold_of_cases(cases, 3, seed=1)
    with pytest.raises(AACScoreError, match="between 2 and the number of cases"):
        fold_of_cases(cases, 8)


# ---------------------------------------------------------------------------------------------- segmenter


@pytest.fixture(scope="module")
def toy_set_and_base(tmp_path_factory):
    """A training set of toy spines (1.25 mm pixels) and a tiny segmenter trained on them, as the base."""
    from AACScoreLib.segmentation.training import train_segmenter

    root = tmp_path_factory.mktemp("segfinetune")
    dataset = TrainingSet(root / "set")
    for seed in range(4):
        pixels, labels = toy_spine(seed)
        dataset.add(Radiograph(pixels.astype(np.float32), (1.25, 1.25), "test", f"toy{seed}.nrrd", "NRRD"), labels)
    base, _ = train_segmenter([], root / "base", name="toy-base", version="1", epochs=1, iterations_per_epoch=2,
                              patch_size=(64, 48), features=(4, 8, 16), batch_size=2, device="cpu",
                              cases=[(case.image, case.labels) for case in dataset.cases()])
    return dataset, Path(base), root


def test_segmenter_finetuning_starts_from_the_base_package(toy_set_and_base):
    from AACScoreLib.segmentation.package import load_segmenter_package

    dataset, base, root = toy_set_and_base
    settings = SegmenterFinetuneSettings(epochs=1, iterations_per_epoch=1, batch_size=2, device="cpu")
    package = finetune_segmenter(dataset.folder, root / "tuned", base, settings, work=root / "work")
    tuned = read_package(package)
    assert tuned.manifest["training_data"]["fine_tuned_from"]["name"] == "toy-base"
    assert tuned.manifest["architecture"]["features_per_stage"] == [4, 8, 16]
    log = next((root / "work" / "results").rglob("training_log_*.txt")).read_text()
    assert "started from the base segmenter's weights; fresh: none" in log
    assert load_segmenter_package(package).network is not None
    rows = segment_cases(package, dataset.cases()[:1], device="cpu")
    assert set(rows[0]) >= {"L1", "L5", "levels_right", "status"}


def test_finetuning_keeps_the_context_classes_only_when_the_cases_draw_them(toy_set_and_base):
    """A base with T12/S1: cases that draw them keep them; cases without them would teach that T12 and the sacrum
    are background, so the fine-tuned model has L1..L5 only and starts from the base's rows for those."""
    from AACScoreLib.segmentation.training import train_segmenter

    dataset, _, root = toy_set_and_base
    assert all(case.context == ("T12", "S1") for case in dataset.cases())
    base, _ = train_segmenter([], root / "context-base", name="toy-context", version="1", epochs=1,
                              iterations_per_epoch=1, patch_size=(64, 48), features=(4, 8, 16), batch_size=2,
                              device="cpu", cases=[(case.image, case.labels) for case in dataset.cases()],
                              context=True)
    settings = SegmenterFinetuneSettings(epochs=1, iterations_per_epoch=1, batch_size=2, device="cpu")
    said: list[str] = []
    kept = finetune_segmenter(dataset.folder, root / "kept", base, settings, work=root / "work-kept", log=said.append)
    assert read_package(kept).manifest["labels"] == ["L1", "L2", "L3", "L4", "L5", "T12", "S1"]
    assert said == ["fine-tuning with the context classes S1, T12 (4 of 4 cases draw them)",
                    "context-base names no training phantoms: fine-tuning on the cases alone, without replay"]
    from AACScoreLib.io.labelmaps import read_label_map

    plain = TrainingSet(root / "plain")
    for case in dataset.cases():
        labels = read_label_map(case.labels, context=True)
        plain.add(read_radiograph(case.image), np.where(labels > 5, 0, labels))
    said.clear()
    dropped = finetune_segmenter(plain.folder, root / "dropped", base, settings, work=root / "work-dropped",
                                 log=said.append)
    assert read_package(dropped).manifest["labels"] == ["L1", "L2", "L3", "L4", "L5"]
    assert "no case draws them: the fine-tuned segmenter labels L1-L5 only" in said[0]
    log = next((root / "work-dropped" / "results").rglob("training_log_*.txt")).read_text()
    assert "started from the base segmenter's weights; fresh: ['" in log


def test_weights_of_another_plan_are_refused_but_new_classes_start_fresh(toy_set_and_base):
    from AACScoreLib.segmentation.package import build_network, load_segmenter_package, transfer_weights

    _, base, _ = toy_set_and_base
    loaded = load_segmenter_package(base)
    more_classes = dict(loaded.dataset_json, labels={**loaded.dataset_json["labels"], "T12": 6, "S1": 7})
    network = build_network(loaded.plans, more_classes)
    fresh = transfer_weights(network, loaded.fold_weights[0], "base")
    assert fresh and all(".seg_layers." in name for name in fresh)
    for name in fresh:  # background and L1..L5 keep the base's output rows; T12 and S1 start fresh
        base_rows = loaded.fold_weights[0][name]
        assert network.state_dict()[name].shape[0] == base_rows.shape[0] + 2
        assert torch.equal(network.state_dict()[name][: base_rows.shape[0]], base_rows.float())
    fewer = dict(loaded.dataset_json, labels={k: v for k, v in loaded.dataset_json["labels"].items() if v < 5})
    network = build_network(loaded.plans, fewer)
    for name in transfer_weights(network, loaded.fold_weights[0], "base"):  # L5 dropped: the rows before it kept
        assert torch.equal(network.state_dict()[name], loaded.fold_weights[0][name][:5].float())
    wider = json.loads(json.dumps(loaded.plans))
    wider["configurations"]["2d"]["architecture"]["arch_kwargs"]["features_per_stage"] = [8, 16, 32]
    with pytest.raises(ModelPackageError, match="does not fit the network being trained"):
        transfer_weights(build_network(wider, loaded.dataset_json), loaded.fold_weights[0], "base")


def test_train_segmenter_can_start_from_a_package_and_add_context_classes(toy_set_and_base, tmp_path):
    from AACScoreLib.segmentation.training import starting_package

    _, base, _ = toy_set_and_base
    with pytest.raises(AACScoreError, match=r"patch \(64, 48\), asked \(320, 256\); give --patch-size 64 48"):
        starting_package(str(base), (320, 256))
    assert cli_main(["train-segmenter", "--phantoms", "2", "--context-classes", "--patch-size", "64", "48",
                     "--batch-size", "2", "--epochs", "1", "--iterations-per-epoch", "1", "--processes", "1",
                     "--device", "cpu", "--init-from", str(base), "--lr", "0.001", "--work", str(tmp_path / "work"),
                     "--out", str(tmp_path / "wider")]) == 0
    trained = read_package(tmp_path / "wider")
    assert trained.manifest["training_data"]["initialised_from"]["name"] == "toy-base"
    assert trained.manifest["labels"][-2:] == ["T12", "S1"]
    log = next((tmp_path / "work" / "results").rglob("training_log_*.txt")).read_text()
    assert "started from the base segmenter's weights; fresh: ['" in log and "seg_layers" in log


def test_finetuning_can_replay_the_bases_own_training_phantoms(toy_set_and_base, tmp_path):
    from AACScoreLib.segmentation.training import train_segmenter
    from AACScoreLib.phantoms.generator import phantom_sources

    dataset, toy_base, _ = toy_set_and_base
    settings = SegmenterFinetuneSettings(epochs=1, iterations_per_epoch=1, batch_size=2, device="cpu", replay=1)
    with pytest.raises(AACScoreError, match="names no training phantoms to replay; fine-tune it with --replay 0"):
        finetune_segmenter(dataset.folder, tmp_path / "refused", toy_base, settings, log=lambda _: None)
    assert not (tmp_path / "refused").exists()
    base, _ = train_segmenter([], tmp_path / "base", name="toy-phantoms", version="1", epochs=1, iterations_per_epoch=1,
                              patch_size=(64, 48), features=(4, 8, 16), batch_size=2, device="cpu",
                              phantoms=phantom_sources(2, 77, ("alt", "projected"), context=True), context=True,
                              training_note={"phantoms": {"n": 2, "seed": 77, "styles": ["alt", "projected"]}})
    tuned = finetune_segmenter(dataset.folder, tmp_path / "tuned", base, settings, work=tmp_path / "work",
                               log=lambda _: None)
    data = read_package(tuned).manifest["training_data"]
    assert data["replayed_phantoms"] == {"n": 1, "seed": 77, "families": ["alt"]}
    assert data["n_cases"] == len(dataset.cases())  # the user's cases; the replayed phantom trains beside them
    assert len(list((tmp_path / "work" / "raw").rglob("labelsTr/*"))) == len(dataset.cases()) + 1


def test_levels_right_needs_every_level_on_its_own_body():
    truth = np.zeros((60, 10), np.uint8)
    for level in range(1, 6):
        truth[10 * level:10 * level + 8] = level
    assert levels_right(truth, truth)
    shifted = np.where(truth > 0, np.clip(truth.astype(int) + 1, 1, 5), 0).astype(np.uint8)
    assert not levels_right(truth, shifted)
    assert not levels_right(truth, np.where(truth == 3, 0, truth))


def test_learning_curve_starts_each_size_from_the_base(tmp_path, tiny_scorer_package):
    from AACScoreLib.finetune import learning_curve

    settings = ScorerFinetuneSettings(epochs=1, batch=2, device="cpu")
    curve = learning_curve("scorer", "alt", [0, 2], 2, tmp_path / "curve", base=str(tiny_scorer_package.path),
                           seed=8500, scorer_settings=settings, size_range=SMALL, log=lambda _: None)
    assert [row["cases"] for row in curve["rows"]] == [0, 2]
    assert all(row["n_test"] == 2 and row["errors"] == 0 for row in curve["rows"])
    assert all(row["interval_coverage"] is None and 0 <= row["flagged"] <= 1 for row in curve["rows"])  # no qc.json
    written = json.loads((tmp_path / "curve" / "curve.json").read_text())
    assert written["test_seed"] == 8501 and written["settings"]["epochs"] == 1  # the recipe measured
    tuned = read_package(tmp_path / "curve" / "scorer-2")
    assert tuned.manifest["training_data"]["fine_tuned_from"]["name"] == "tiny-scorer"
