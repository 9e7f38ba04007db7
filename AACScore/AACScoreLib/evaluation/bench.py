"""`aacscore bench`: seconds per stage and end to end, batch throughput and peak memory, on CPU or CUDA.

Benchmarks are a command, not tests: their figures go in the closing notes and the README.
"""

from __future__ import annotations

import csv
import json
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ..io.atomic import write_text_atomic

BENCH_SEED = 31337
STAGES = ("read", "segment", "crop", "score", "heatmap", "qc", "write")  # write: label map and overlay files


def run_benchmark(pipeline, images: list[Path], single_runs: int, batch_out: Path) -> dict:
    """Time the first `single_runs` images one by one (stages, end to end), then the whole list as a batch.

    Besides wall-clock seconds, the CPU seconds of each single image are reported: on a machine shared with other
    work the wall clock measures the others too, the CPU time (nearly) does not.

    A single image does the work of one batch row, one step after the other: score it, then write its label map
    and overlay. The batch is compared with the sum of the single-image times of the same images (estimated from
    their mean when fewer were timed singly). Images the models fail on count in both sums, as they cost time in
    both, but are left out of the per-stage and end-to-end figures.
    """
    from ..batch import score_cohort, write_outputs
    from ..io.cohort import WorkItem

    pipeline.run(images[0])  # warm-up: lazy initialisation, allocator, kernels
    per_stage: dict[str, list[float]] = {stage: [] for stage in STAGES}
    single, end_to_end, scoring, cpu = [], [], [], []
    single_out = batch_out / "single"
    for image in images[:single_runs]:
        start, cpu_start = time.perf_counter(), time.process_time()
        result = pipeline.run(image)
        scored = time.perf_counter()
        write_outputs({"file": str(image)}, result, single_out, image.stem)
        single.append(time.perf_counter() - start)
        if result.status != "error":
            end_to_end.append(single[-1])
            cpu.append(time.process_time() - cpu_start)
            scoring.append(scored - start)
            per_stage["write"].append(single[-1] - (scored - start))
            for stage in STAGES[:-1]:
                per_stage[stage].append(result.seconds.get(stage, 0.0))
    if not end_to_end:
        raise RuntimeError(f"none of the first {len(single)} benchmark images could be scored")
    start = time.perf_counter()
    table = score_cohort(pipeline, [WorkItem(p) for p in images], batch_out / "batch")
    batch_seconds = time.perf_counter() - start
    with open(table, newline="") as stream:
        batch_errors = sum(row["status"] == "error" for row in csv.DictReader(stream))
    single_sum = sum(single) if len(single) == len(images) else statistics.mean(single) * len(images)
    return {
        "stages_s_per_image": {stage: round(statistics.mean(v), 3) for stage, v in per_stage.items()},
        "end_to_end_s_per_image": round(statistics.mean(end_to_end), 3),
        "scoring_s_per_image": round(statistics.mean(scoring), 3),
        "end_to_end_s_max": round(max(end_to_end), 3),
        # CPU seconds of all the process's threads: what an image costs when other work shares the cores
        "end_to_end_cpu_s_per_image": round(statistics.mean(cpu), 3),
        "single_images_timed": len(single),
        "single_images_failed": len(single) - len(end_to_end),
        "single_sum_s": round(single_sum, 2),
        "batch_images": len(images),
        "batch_errors": batch_errors,
        "batch_s": round(batch_seconds, 2),
        "batch_s_per_image": round(batch_seconds / len(images), 3),
        "batch_vs_sum_of_single": round(batch_seconds / single_sum, 3),
        "images_per_hour": round(3600 * len(images) / batch_seconds),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def run_dicomweb_benchmark(pipeline, images: list[Path], server, work: Path) -> dict:
    """The same radiographs scored from disk, from disk with DICOM files written, and from a DICOMweb server with
    the SEG, SR and heatmap stored back; then what was stored is queried back and compared with results.csv.

    The images are uploaded first (not timed). Each run is a fresh batch (score_cohort) with heatmaps.
    """
    import pydicom

    from ..batch import score_cohort
    from ..dicom_batch import DicomOutputs, PacsSource, verify_stored
    from ..io.cohort import WorkItem

    pipeline.run(images[0])  # warm-up: lazy initialisation, allocator, kernels
    seconds = {}
    for name, dicom in (("disk", None), ("disk_dicom_files", DicomOutputs(work / "disk_dicom_files" / "dicom"))):
        start = time.perf_counter()
        score_cohort(pipeline, [WorkItem(p) for p in images], work / name, dicom=dicom)
        seconds[name] = time.perf_counter() - start
    for index in range(0, len(images), 10):
        server.store([pydicom.dcmread(p) for p in images[index:index + 10]])
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in images}
    source = PacsSource(server, [i for i in server.find([{"Modality": "DX"}]) if i.sop in uids])
    start = time.perf_counter()
    table = score_cohort(pipeline, source.items(), work / "dicomweb", names=source.names(), read=source.read,
                         dicom=DicomOutputs(None, server, source))
    seconds["dicomweb_store"] = time.perf_counter() - start
    return {
        "images": len(images),
        "found_on_server": len(source.instances),
        "batch_s": {name: round(value, 2) for name, value in seconds.items()},
        "s_per_image": {name: round(value / len(images), 3) for name, value in seconds.items()},
        "dicomweb_vs_disk": round(seconds["dicomweb_store"] / seconds["disk"], 3),
        "dicomweb_vs_disk_dicom_files": round(seconds["dicomweb_store"] / seconds["disk_dicom_files"], 3),
        "round_trip": verify_stored(server, table),
    }


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="time each stage, end to end and in a batch")
    parser.add_argument("--n", type=int, default=100, help="batch size (phantoms made for the run)")
    parser.add_argument("--single", type=int, default=0,
                        help="images timed one by one before the batch (default 0: all of them, for an exact ratio)")
    parser.add_argument("--size", type=int, default=3000,
                        help="phantom side in pixels (square, so 3000 is 25%% more pixels than a 3000x2400 radiograph)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--scorer")
    parser.add_argument("--segmenter")
    parser.add_argument("--out", type=Path, help="folder for bench.json (default: a temporary folder)")
    parser.add_argument("--dicomweb", metavar="URL",
                        help="instead: score the phantoms from disk and from this DICOMweb server (uploaded first, "
                             "results stored back and checked), e.g. dicomweb+http://localhost:8042/dicom-web")
    parser.add_argument("--user", help="DICOMweb user (password from $AACSCORE_DICOMWEB_PASSWORD)")
    parser.add_argument("--token", action="store_true", help="DICOMweb bearer token from $AACSCORE_DICOMWEB_TOKEN")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    import torch

    from ..phantoms.generator import phantom_name, write_phantoms
    from ..pipeline import Pipeline

    work = Path(args.out or tempfile.mkdtemp(prefix="aacscore-bench-"))
    phantoms = work / f"phantoms_{args.size}"
    images = [phantoms / f"{phantom_name(BENCH_SEED, index)}.dcm" for index in range(args.n)]
    if not all(image.is_file() for image in images):  # an earlier run's phantoms in the same --out are reused
        images = sorted(write_phantoms(phantoms, args.n, seed=BENCH_SEED, size_range=(args.size, args.size)))
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)  # a batch left from an earlier run would resume instead of running
    pipeline = Pipeline.from_packages(args.scorer, args.segmenter, args.device)
    if args.dicomweb:
        from ..io.dicomweb import DicomWebServer

        server = DicomWebServer.from_options(args.dicomweb, args.user, args.token)
        figures = run_dicomweb_benchmark(pipeline, images, server, runs)
    else:
        figures = run_benchmark(pipeline, images, min(args.single or len(images), len(images)), runs)
    if torch.cuda.is_available() and args.device != "cpu":
        figures["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    figures["machine"] = {"device": args.device, "cuda": torch.cuda.is_available(), "threads": torch.get_num_threads(),
                          "cpu": platform.processor() or platform.machine(), "size": f"{args.size}x{args.size}"}
    written = work / ("bench-dicomweb.json" if args.dicomweb else "bench.json")
    write_text_atomic(written, json.dumps(figures, indent=2))
    json.dump(figures, sys.stdout, indent=2)
    print(f"\nwritten: {written}")
    return 0
