"""The scoring network, its training loop, model packages, Grad-CAM and crops from phantoms (all small and fast)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from AACScoreLib.scoring import data as scorer_data
from AACScoreLib.errors import AACScoreError, ModelPackageError
from AACScoreLib.scoring.gradcam import band_fraction, grad_cam
from AACScoreLib.scoring.scorer import Scorer
from AACScoreLib.scoring.data import CropSet, augment_batch, load_crop_set, read_score_csv, split_indices
from AACScoreLib.scoring.model import SCSE, build_model, load_imagenet_weights, scse_blocks, state_dict_fp16
from AACScoreLib.scoring.training import (TrainResult, TrainSettings, build_manifest, data_summary, evaluate_model, lr_at, train,
                                         write_scorer_package)

SIZE = (64, 32)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: far faster than two on a machine whose cores are busy with other work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synthetic_set(n: int = 16, seed: int = 0) -> CropSet:
    """Crops whose score is written as the length of a bright bar in the anterior strip."""
    generator = torch.Generator().manual_seed(seed)
    crops = torch.rand(n, 1, *SIZE, generator=generator) * 0.3
    totals = torch.randint(0, 25, (n,), generator=generator).float()
    subscores = torch.randint(0, 4, (n, 8), generator=generator).float()
    for i in range(n):
        crops[i, 0, 4:4 + int(totals[i]) * 2, 2:8] = 1.0
    return CropSet(crops, totals, subscores, [f"case{i}" for i in range(n)])


def tiny_settings(**changes) -> TrainSettings:
    base = dict(input_size=SIZE, backbone="resnet18", epochs=3, batch=8, warmup_iterations=2, val_every=1,
                patience=10, seed=3)
    return TrainSettings(**{**base, **changes})


# ------------------------------------------------------------------------------------------ model


def test_scse_keeps_shape_for_both_combinations():
    x = torch.rand(2, 64, 8, 4)
    for combine in ("max", "add"):
        assert SCSE(64, combine=combine)(x).shape == x.shape
    with pytest.raises(ValueError):
        SCSE(64, combine="mean")


def test_scse_follows_every_residual_block_of_resnet34():
    model = build_model({"backbone": "resnet34"}).eval()
    blocks = scse_blocks(model)
    assert len(blocks) == 16
    basic = [m for m in model.modules() if type(m).__name__ == "BasicBlock"]
    assert len(basic) == 16 and all(any(b.block is m for b in blocks) for m in basic)
    calls = []
    hooks = [b.scse.register_forward_hook(lambda *_: calls.append(1)) for b in blocks]
    with torch.no_grad():
        out = model(torch.rand(2, 1, 64, 32))
    for hook in hooks:
        hook.remove()
    assert len(calls) == 16 and out.shape == (2, 1)
    head = list(model.head)
    assert [type(m).__name__ for m in head] == ["BatchNorm1d", "Dropout", "Linear"] and head[1].p == 0.5
    assert model.backbone.conv1.in_channels == 1
    assert build_model({"backbone": "resnet18", "subscores_head": True}).eval()(torch.rand(2, 1, 64, 32)).shape == (2, 9)


def test_imagenet_weights_load_with_summed_first_filters_and_checked_name(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "resnet18-00000000.pth"
    torch.save(reference, path)
    with pytest.raises(ModelPackageError, match="does not match"):
        load_imagenet_weights(build_model({"backbone": "resnet18"}), path)
    good = tmp_path / "resnet18.pth"
    path.rename(good)
    model = build_model({"backbone": "resnet18"}, imagenet_weights=good)
    assert torch.allclose(model.backbone.conv1.weight, reference["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(model.backbone.layer4[1].block.conv2.weight, reference["layer4.1.conv2.weight"])


# ------------------------------------------------------------------------------------------ training


def test_lr_schedule_warms_up_then_decays_to_the_minimum():
    s = TrainSettings()
    total = 5000
    assert lr_at(0, total, s) == pytest.approx(0.01 / 3)
    assert lr_at(100, total, s) == pytest.approx((0.01 / 3 + 0.01) / 2)
    assert lr_at(200, total, s) == pytest.approx(0.01)
    assert lr_at(total, total, s) == pytest.approx(1e-4)
    values = [lr_at(i, total, s) for i in range(200, total + 1, 100)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_augmentation_is_seeded_and_changes_the_image():
    batch = synthetic_set(4).crops
    first = augment_batch(batch, torch.Generator().manual_seed(1))
    again = augment_batch(batch, torch.Generator().manual_seed(1))
    other = augment_batch(batch, torch.Generator().manual_seed(2))
    assert first.shape == batch.shape and torch.equal(first, again)
    assert not torch.equal(first, other) and not torch.allclose(first, batch.float())
    assert 0.0 <= float(first.min()) and float(first.max()) <= 1.0
    assert torch.equal(augment_batch(batch, torch.Generator().manual_seed(1), robust=True),
                       augment_batch(batch, torch.Generator().manual_seed(1), robust=True))


def test_training_augments_only_training_images_and_loss_falls(tmp_path, monkeypatch):
    data = synthetic_set(24)
    train_set, val_set = data.subset(range(16)), data.subset(range(16, 24))
    seen = []

    def spy(batch, generator, robust=False, rotation=30.0):
        seen.append(batch.clone())
        return augment_batch(batch, generator, robust, rotation)

    monkeypatch.setattr(scorer_data, "augment_batch", spy)
    model, result = train(train_set, val_set, tiny_settings(epochs=8, lr=0.02), tmp_path, log=lambda _: None)
    assert len(seen) == 8 * 2
    for batch in seen:
        for image in batch:
            assert any(torch.equal(image, t) for t in train_set.crops)
            assert not any(torch.equal(image, v) for v in val_set.crops)
    losses = [entry["train_loss"] for entry in result.history]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:2])
    assert result.iterations == 16 and "val_mae" in result.history[-1]


def test_resume_continues_from_the_saved_iteration_and_matches_an_uninterrupted_run(tmp_path):
    data = synthetic_set(12)
    train_set, val_set = data.subset(range(10)), data.subset(range(10, 12))
    settings = tiny_settings(epochs=4, val_every=2)
    quiet = dict(log=lambda _: None)
    full, _ = train(train_set, val_set, settings, tmp_path / "full", checkpoint_seconds=0, **quiet)

    def interrupt(epoch, entry):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(train_set, val_set, settings, tmp_path / "cut", checkpoint_seconds=0, on_epoch_end=interrupt, **quiet)
    saved = json.loads((tmp_path / "cut" / "checkpoint.json").read_text())
    assert saved["epoch"] == 2 and saved["iteration"] == 4
    resumed, result = train(train_set, val_set, settings, tmp_path / "cut", resume=True, **quiet)
    assert [e["iteration"] for e in result.history] == [2, 4, 6, 8]
    for (key, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
    with pytest.raises(AACScoreError, match="other settings"):
        train(train_set, val_set, tiny_settings(epochs=5), tmp_path / "cut", resume=True, **quiet)


# ------------------------------------------------------------------------------------------ package and inference


def test_package_round_trip_gives_identical_outputs(tmp_path):
    data = synthetic_set(8)
    settings = tiny_settings(subscores_head=True)
    model = build_model(settings.architecture())
    model.set_target_scale(10.0, 6.0)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict_fp16(model).items()})
    model.eval()
    result = TrainResult(0, 0, 0, None, 0.0, "cpu")
    metrics = {"validation": evaluate_model(model, data, torch.device("cpu"))}
    manifest = build_manifest(model, settings, result, data_summary(data, "synthetic"), metrics, "test-scorer", "0.1")
    package = write_scorer_package(tmp_path / "pkg", model, manifest)
    scorer = Scorer.from_package(tmp_path / "pkg")
    assert scorer.input_size == SIZE and scorer.has_subscores
    assert scorer.manifest["labels"][0] == "aac24" and len(scorer.manifest["labels"]) == 9
    with torch.no_grad():
        assert torch.equal(model(data.crops[:4].float()), scorer.model(data.crops[:4].float()))
    crop = data.crops[0, 0].numpy().astype(np.float32) * 1000.0 + 50.0  # raw intensities: the scorer normalises
    score = scorer.score(crop)
    with torch.no_grad():
        expected = float(model(scorer.prepare(crop))[0, 0].clamp(0, 24))
    assert score.aac24 == pytest.approx(expected) and set(score.subscores) == {"L1A", "L1P", "L2A", "L2P",
                                                                              "L3A", "L3P", "L4A", "L4P"}
    fused, heat = scorer.score_and_heatmap(crop)
    assert fused == score and heat.crop_map.shape == SIZE
    assert score.category in ("no/mild", "moderate", "severe")
    weights = tmp_path / "pkg" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ModelPackageError):
        Scorer.from_package(package.path)


def test_grad_cam_shape_mapping_and_all_zero_case():
    from AACScoreLib.geometry.spine import Crop

    model = build_model({"backbone": "resnet18"}).eval()
    image = synthetic_set(1).crops[0:1].float()
    heat = grad_cam(model, image)
    assert heat.crop_map.shape == SIZE and heat.crop_map.dtype == np.float32
    assert 0.0 <= heat.crop_map.min() and heat.crop_map.max() <= 1.0
    assert not heat.all_zero and heat.crop_map.max() == pytest.approx(1.0)
    crop = Crop(affine=np.array([[2.0, 0, 10], [0, 2.0, 20], [0, 0, 1]]), shape=(128, 64))
    on_image = heat.on_image(crop, (200, 120))
    assert on_image.shape == (200, 120) and on_image[:9].max() == 0.0 and on_image[:, :19].max() == 0.0
    with torch.no_grad():
        model.head[2].weight.zero_()  # a constant output: no gradient, so nothing raised the score
    flat = grad_cam(model, image)
    assert flat.all_zero and not flat.crop_map.any() and flat.crop_map.shape == SIZE
    assert band_fraction(flat.on_image(crop, (200, 120)), geometry=None) is None


# ------------------------------------------------------------------------------------------ data from phantoms


def test_crops_from_phantoms_are_cached_and_labelled(tmp_path):
    from AACScoreLib.phantoms.generator import write_phantoms

    write_phantoms(tmp_path / "ph", 2, seed=2100, size_range=(800, 900))
    records = read_score_csv(tmp_path / "ph" / "truth.csv")
    assert len(records) == 2 and records[0].labels.name.endswith("_labels.png") and records[0].subscores is not None
    crops = load_crop_set(records, SIZE, cache_dir=tmp_path / "cache")
    assert crops.crops.shape == (2, 1, *SIZE) and not crops.skipped
    assert float(crops.crops.min()) >= 0.0 and float(crops.crops.max()) <= 1.0
    assert crops.totals.tolist() == [r.aac24 for r in records]
    cached = list((tmp_path / "cache").glob("crops_64x32_*.npz"))
    assert len(cached) == 1
    assert torch.equal(load_crop_set(records, SIZE, cache_dir=tmp_path / "cache").crops, crops.crops)
    (tmp_path / "ph" / "truth.csv").write_text("file,score\nx.dcm,3\n")
    with pytest.raises(AACScoreError, match="aac24"):
        read_score_csv(tmp_path / "ph" / "truth.csv")


def test_in_memory_phantom_crops_match_the_written_files_and_are_cached(tmp_path):
    from AACScoreLib.phantoms.generator import generate_phantom, write_phantom

    phantom = generate_phantom(2101, "alt", 1)
    dcm = write_phantom(phantom, tmp_path / "ph")
    from_file = scorer_data.crop_record(scorer_data.ScoreRecord(dcm, dcm.with_name(f"{phantom.name}_labels.png"), 0),
                                        SIZE)
    crop, total, subscores, name = scorer_data.phantom_case(2101, 1, "alt", SIZE)
    assert name == dcm.name and total == phantom.truth["aac24"] and sum(subscores) == total
    assert np.abs(crop.astype(np.float32) - from_file).max() < 2e-3  # float16 rounding only

    made = scorer_data.synthetic_crop_set(2, 2101, ["default", "alt"], SIZE, cache_dir=tmp_path / "cache", workers=1)
    assert made.names == ["phantom_s2101_0000.dcm", "phantom_alt_s2101_0001.dcm"] and not made.skipped
    assert made.crops.shape == (2, 1, *SIZE) and made.subscores.shape == (2, 8)
    assert torch.equal(made.crops[1, 0], torch.from_numpy(crop))
    cached = list((tmp_path / "cache").glob("phantoms_2101_2_default-alt_64x32.npz"))
    assert len(cached) == 1
    again = scorer_data.synthetic_crop_set(2, 2101, ["default", "alt"], SIZE, cache_dir=tmp_path / "cache")
    assert torch.equal(again.crops, made.crops) and again.names == made.names
    first = scorer_data.synthetic_crop_set(1, 2101, ["default", "alt"], SIZE, cache_dir=tmp_path / "cache")
    assert first.names == made.names[:1] and torch.equal(first.crops, made.crops[:1])  # from the larger cache
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    with pytest.raises(AACScoreError, match="styles"):
        scorer_data.synthetic_crop_set(2, 2101, ["fancy"], SIZE)


def test_split_is_seeded_and_disjoint():
    train_index, val_index = split_indices(10, 0.2, seed=4)
    assert len(val_index) == 2 and not set(train_index) & set(val_index)
    assert (train_index, val_index) == split_indices(10, 0.2, seed=4)


# ------------------------------------------------------------------------------------------ randomisation and budget


def test_randomised_crops_depend_only_on_their_draw_and_stay_normalised():
    from AACScoreLib.scoring.data import TrainingCrops

    crops = synthetic_set(6).crops
    plain = TrainingCrops(crops)
    assert torch.equal(plain[(2, 7)], crops[2].float())
    always = TrainingCrops(crops, probability=1.0, seed=5)
    first, again, other = always[(2, 7)], always[(2, 7)], always[(2, 8)]
    assert first.shape == crops[2].shape and torch.equal(first, again)
    assert not torch.equal(first, other) and not torch.allclose(first, crops[2].float(), atol=0.05)
    assert 0.0 <= float(first.min()) and float(first.max()) <= 1.0
    assert torch.equal(TrainingCrops(crops, probability=1.0, seed=6)[(2, 7)], TrainingCrops(crops, 1.0, seed=6)[(2, 7)])
    half = TrainingCrops(crops, probability=0.5, seed=5)
    changed = sum(not torch.equal(half[(0, draw)], crops[0].float()) for draw in range(40))
    assert 8 <= changed <= 32
    with pytest.raises(ValueError):
        TrainingCrops(crops, probability=1.5)


def test_randomised_training_does_not_depend_on_the_loader_processes(tmp_path):
    data = synthetic_set(12)
    train_set, val_set = data.subset(range(10)), data.subset(range(10, 12))
    settings = tiny_settings(epochs=1, randomise=1.0, augment="none")
    quiet = dict(log=lambda _: None)
    seen = {}

    def record(name):
        def hook(epoch, entry):
            seen[name] = entry["train_loss"]
        return hook

    inline, _ = train(train_set, val_set, settings, tmp_path / "inline", on_epoch_end=record("inline"), **quiet)
    workers, _ = train(train_set, val_set, settings, tmp_path / "workers", loader_workers=2,
                       on_epoch_end=record("workers"), **quiet)
    train(train_set, val_set, tiny_settings(epochs=1, augment="none"), tmp_path / "plain",
          on_epoch_end=record("plain"), **quiet)
    for (key, a), b in zip(inline.state_dict().items(), workers.state_dict().values()):
        assert torch.equal(a, b), key
    assert seen["inline"] == seen["workers"] != seen["plain"]  # the randomised crops are what the network saw


def test_randomised_copies_keep_the_targets_and_depend_only_on_seed_crop_and_copy(tmp_path):
    from AACScoreLib.scoring.data import with_randomised_copies

    data = synthetic_set(3)
    made = with_randomised_copies(data, 2, seed=4)
    assert len(made) == 9 and made.names[3:6] == [f"{name}#r1" for name in data.names]
    assert torch.equal(made.crops[:3], data.crops) and made.crops.dtype == data.crops.dtype
    assert torch.equal(made.totals, data.totals.repeat(3)) and torch.equal(made.subscores[6:], data.subscores)
    assert not torch.allclose(made.crops[3].float(), data.crops[0].float(), atol=0.05)
    assert not torch.equal(made.crops[3], made.crops[6])  # copy 1 and copy 2 of the same crop differ
    assert 0.0 <= float(made.crops.min()) and float(made.crops.max()) <= 1.0
    assert torch.equal(with_randomised_copies(data, 2, seed=4, workers=2).crops, made.crops)
    assert with_randomised_copies(data, 0, seed=4) is data

    quiet = dict(log=lambda _: None)
    model, result = train(data.subset(range(2)), data.subset([2]), tiny_settings(epochs=1, batch=2, randomise_copies=1,
                                                                                augment="none"), tmp_path, **quiet)
    assert result.iterations == 2  # 2 crops and their 2 copies: two batches of 2 (without copies: one)
    with pytest.raises(ValueError, match="randomise_copies"):
        train(data.subset(range(2)), data.subset([2]), tiny_settings(randomise_copies=-1), tmp_path / "bad", **quiet)


def test_time_budget_stops_after_the_epochs_that_fit(tmp_path):
    data = synthetic_set(12)
    train_set, val_set = data.subset(range(10)), data.subset(range(10, 12))
    model, result = train(train_set, val_set, tiny_settings(epochs=50, val_every=10, time_budget_minutes=1e-4),
                          tmp_path, log=lambda _: None)
    assert result.epochs_run == 3  # the epochs it takes to measure an epoch's time
    assert "val_loss" in result.history[-1]  # the last epoch validates and the best weights are kept
    assert (tmp_path / "best.safetensors").is_file()


def test_training_refuses_the_held_out_family_unless_allowed(monkeypatch):
    from AACScoreLib.phantoms import generator
    from AACScoreLib.phantoms.families import FAMILIES, Family
    from AACScoreLib.scoring.training import training_families

    monkeypatch.setitem(FAMILIES, "kept_out", Family(FAMILIES["alt"].generate, "test family", held_out=True))
    monkeypatch.setattr(generator, "STYLES", tuple(FAMILIES))
    assert training_families("default,alt", allow_held_out=False) == ("default", "alt")
    with pytest.raises(AACScoreError, match="kept_out is the held-out family"):
        training_families("default,kept_out", allow_held_out=False)
    assert training_families("default,kept_out", allow_held_out=True) == ("default", "kept_out")
    with pytest.raises(AACScoreError, match="styles"):
        training_families("default,unknown", allow_held_out=True)


# ------------------------------------------------------------------------------------------ where Grad-CAM looks


def test_grad_cam_needs_no_gradients_before_its_layer_and_restores_them():
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = build_model({"backbone": "resnet18"}).eval()
    model.backbone.layer1.requires_grad_(False)  # a caller's own setting must survive
    image = synthetic_set(1).crops[0:1].float()
    with GradCAM(model=model, target_layers=[model.target_layer]) as cam:
        reference = cam(input_tensor=image, targets=[ClassifierOutputTarget(0)])[0]
    heat = grad_cam(model, image)
    np.testing.assert_allclose(heat.crop_map, np.clip(reference, 0, 1), atol=1e-5)
    assert not any(p.requires_grad for p in model.backbone.layer1.parameters())
    assert all(p.requires_grad for p in model.backbone.layer2.parameters())


def test_heat_shares_compare_the_heat_on_a_region_with_its_area():
    from AACScoreLib.scoring.gradcam import heat_shares

    region = np.zeros(SIZE, np.float32)
    region[:, :8] = 1.0
    on_region = region * 3.0
    uniform = np.ones(SIZE, np.float32)
    assert heat_shares(on_region, {"r": region}) == {"r_heat": 1.0, "r_area": 0.25}
    assert heat_shares(uniform, {"r": region})["r_heat"] == pytest.approx(0.25)
    assert heat_shares(np.zeros(SIZE, np.float32), {"r": region})["r_heat"] is None


def test_plaque_mask_covers_the_drawn_plaque_and_grows_with_the_tolerance():
    from AACScoreLib.phantoms.generator import generate_phantom
    from AACScoreLib.scoring.gradcam import plaque_mask

    phantom = next(p for p in (generate_phantom(2102, "default", i, size_range=(700, 800)) for i in range(6))
                   if p.truth["aac24"] >= 5)
    near = plaque_mask(phantom, 2.0)
    wider = plaque_mask(phantom, 6.0)
    assert near[phantom.plaque_mask].all() and near.sum() > phantom.plaque_mask.sum()
    assert wider[near].all() and wider.sum() > near.sum()
    phantom.plaque_mask = None  # a family without its own mask: the deposits' centre lines in the truth
    from_truth = plaque_mask(phantom, 2.0)
    assert from_truth.any() and (from_truth & near).sum() > 0.5 * from_truth.sum()


def test_gradcam_report_measures_each_phantom_and_writes_its_tables(tmp_path):
    import csv

    from AACScoreLib.evaluation.gradcam_report import gradcam_report

    scorer = Scorer.from_package(None)  # the bundled demo scorer
    report = gradcam_report(scorer, ["default"], 2, 2103, tmp_path, 5.0, size_range=(700, 800))
    summary = report["families"]["default"]
    assert summary["n"] == 2 and report["input_size"] == list(scorer.input_size)
    with open(tmp_path / "gradcam_cases.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["file"] for row in rows] == ["phantom_s2103_0000.dcm", "phantom_s2103_0001.dcm"]
    for row in rows:
        assert 0.0 < float(row["band_area"]) < 1.0
        if row["all_zero"] == "False":
            assert 0.0 <= float(row["band_heat"]) <= 1.0 and 0.0 <= float(row["plaque_heat"]) <= 1.0
    assert json.loads((tmp_path / "gradcam_summary.json").read_text())["families"]["default"] == summary


def test_generalisation_report_scores_a_family_from_its_true_labels_and_reuses_its_phantoms(tmp_path):
    from AACScoreLib.evaluation.generalisation import format_summary, run_generalisation
    from AACScoreLib.pipeline import Pipeline

    pipeline = Pipeline(Scorer.from_package(None))
    table = run_generalisation(pipeline, ["alt"], 3, 2104, tmp_path, ["true-labels"], bootstrap=20,
                               size_range=(700, 800))
    row = table["alt"]["true-labels"]
    assert row["n"] == 3 and row["excluded"] == 0 and row["mae"] >= 0 and row["dice_mean"] is None
    assert (tmp_path / "alt" / "true-labels" / "evaluation" / "report.md").is_file()
    summary = format_summary(table, {"scorer": "demo", "segmenter": "not used", "n": 3, "seed": 2104,
                                     "bootstrap": 20})
    assert "| alt | true-labels | 3 (0) |" in summary and "| Shao et al. 2025 | external validation" in summary
    dicom = tmp_path / "alt" / "phantoms" / "phantom_alt_s2104_0000.dcm"
    written = dicom.stat().st_mtime_ns
    run_generalisation(pipeline, ["alt"], 3, 2104, tmp_path, ["true-labels"], bootstrap=20, size_range=(700, 800))
    assert dicom.stat().st_mtime_ns == written
