"""`aacscore score`: run the pipeline over a cohort, resumable, shardable, one results row per input.

Models are loaded once; the next radiograph is read on a second thread while the current one is scored. Each
finished image gets its label map and heatmap overlay written atomically and its row added to results.csv, so
an interruption loses nothing already done and a rerun continues where it stopped.
"""

from __future__ import annotations

import fcntl
import logging
import sys
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .io.cohort import WorkItem, collect, output_names, parse_shard
from .errors import AACScoreError, Cancelled, RadiographError
from .io.labelmaps import write_label_png
from .io.overlay import render_overlay, save_overlay
from .io.radiograph import read_or_error
from .io.results_file import ResultsFile

log = logging.getLogger(__name__)


def results_path(out_dir: Path, shard: tuple[int, int] | None) -> Path:
    if shard is None:
        return out_dir / "results.csv"
    return out_dir / "shards" / f"results-{shard[0]:04d}-of-{shard[1]:04d}.csv"


def score_cohort(
    pipeline,
    items: Sequence[WorkItem],
    out_dir: str | Path,
    *,
    names: dict[Path, str] | None = None,
    shard: tuple[int, int] | None = None,
    heatmaps: bool = True,
    retry_errors: bool = False,
    anterior: str | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Path:
    """Score `items` into `out_dir`; returns the results table's path. Already scored inputs are skipped."""
    out_dir = Path(out_dir)
    names = names or output_names(items)
    table_path = results_path(out_dir, shard)
    with ResultsFile(table_path) as results, ThreadPoolExecutor(max_workers=1) as writer:
        todo = [item for item in items if not results.done(str(item.image), retry_errors, pipeline.models)]
        pending: Future | None = None  # the previous image's outputs, written while this one is scored

        finished = 0

        def finish(future: Future) -> None:
            nonlocal finished
            row = future.result()
            results.add(row)  # only once its label map and overlay are on disk
            finished += 1
            if progress is not None:
                progress(finished, len(todo), f"{Path(row['file']).name}: {row['status']} {row.get('aac24') or ''}")

        try:
            for done, (item, radiograph) in enumerate(_read_ahead(todo), start=1):
                if cancel is not None and cancel():
                    raise Cancelled(f"cancelled after {done - 1} of {len(todo)} radiographs")
                row, result = _score_one(pipeline, item, radiograph, heatmaps, anterior)
                if pending is not None:
                    finish(pending)
                    pending = None
                pending = writer.submit(write_outputs, row, result, out_dir, names[item.image])
        finally:  # also on a cancel or an interrupt: the last finished image keeps its row
            if pending is not None:
                finish(pending)
    if shard is not None:
        merge_shards(out_dir)
    return table_path


def merge_shards(out_dir: str | Path) -> Path:
    """Join every shard's table into out_dir/results.csv (under a lock, so the last shard to finish sees all)."""
    out_dir = Path(out_dir)
    merged = out_dir / "results.csv"
    with open(out_dir / ".results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = ResultsFile(merged)
        for shard_file in sorted((out_dir / "shards").glob("results-*.csv")):
            for row in ResultsFile(shard_file).values():
                table.add(row)
        table.save()
    return merged


def _read_ahead(items: Sequence[WorkItem]) -> Iterable[tuple[WorkItem, object]]:
    """Yield (item, Radiograph or RadiographError) with the next file read on a worker thread."""
    with ThreadPoolExecutor(max_workers=1) as reader:
        futures: list[Future] = [reader.submit(read_or_error, item.image) for item in items[:2]]
        for index, item in enumerate(items):
            radiograph = futures[index].result()
            if index + 2 < len(items):
                futures.append(reader.submit(read_or_error, items[index + 2].image))
            futures[index] = None  # free the pixels once used
            yield item, radiograph


def _score_one(pipeline, item: WorkItem, radiograph, heatmaps: bool, anterior) -> tuple[dict, object]:
    """(row, pipeline result or None): never raises for a bad image, only for a cancel."""
    start = time.perf_counter()
    result = None
    if isinstance(radiograph, RadiographError):
        row = {"file": str(item.image), "status": "error", "message": str(radiograph)}
    else:
        try:
            result = pipeline.run(radiograph, item.labels, anterior=anterior, heatmap=heatmaps)
            row = result.record()
            row["file"] = str(item.image)
        except Cancelled:
            raise
        except Exception as error:  # one image's failure must never stop the cohort or lose written rows
            row = _internal_error(item.image, error)
    row["seconds"] = round(time.perf_counter() - start, 3)
    row["models"] = pipeline.models
    return row, result


def write_outputs(row: dict, result, out_dir: Path, stem: str) -> dict:
    """Write the label map and the overlay of a scored image (on the writer thread); returns the row."""
    if result is None:
        return row
    try:
        if result.labels is not None:
            row["labels"] = str(write_label_png(out_dir / "labels" / f"{stem}_labels.png", result.labels))
        if result.status != "error":
            title = f"{Path(row['file']).name}  AAC-24 {result.aac24:.1f} ({result.category})"
            if result.heatmap_all_zero:
                title += "  heatmap: all zero"
            picture = render_overlay(result.radiograph.pixels, result.heatmap, result.labels, result.geometry,
                                     title, result.category)
            row["heatmap"] = str(save_overlay(out_dir / "overlays" / f"{stem}_heatmap.png", picture))
    except Exception as error:  # a full disk or a bad picture loses this image's files, not the cohort
        return {**_internal_error(Path(row["file"]), error), "seconds": row.get("seconds")}
    return row


def _internal_error(path: Path, error: Exception) -> dict:
    log.error("%s: unexpected failure\n%s", path, traceback.format_exc())
    kind = "" if isinstance(error, AACScoreError) else f"internal error ({type(error).__name__}): "
    return {"file": str(path), "status": "error", "message": f"{kind}{error}"}


class _ProgressBar:
    """One status line with count, percentage and ETA, on stderr."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.start = time.monotonic()

    def __call__(self, done: int, total: int, text: str) -> None:
        elapsed = time.monotonic() - self.start
        eta = elapsed / done * (total - done) if done else 0.0
        line = f"[{done}/{total}] {100 * done / max(total, 1):3.0f}%  eta {_duration(eta)}  {text}"
        end = "\n" if done == total or not self.stream.isatty() else "\r"
        print(line[:150].ljust(80 if self.stream.isatty() else 0), end=end, file=self.stream, flush=True)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds + 0.5), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "score", help="score radiographs (files, folders or CSV lists) into DIR/results.csv with overlays",
        description="Score radiographs end to end. Resumes an interrupted run in the same --out folder.",
    )
    parser.add_argument("paths", nargs="+", help="radiograph files, folders, or CSV lists with a 'file' column "
                        "(and optionally 'labels': a corrected label map used instead of the segmenter)")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--scorer", help="scorer package name, name==version or path (default: newest installed, "
                        "else the bundled demo)")
    parser.add_argument("--segmenter", help="segmenter package name, name==version or path")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--shard", help="i/n: score only the i-th of n parts (0 <= i < n), for job arrays")
    parser.add_argument("--anterior", choices=("left", "right"), help="force the anterior side for every image")
    parser.add_argument("--no-heatmap", action="store_true", help="skip Grad-CAM (faster)")
    parser.add_argument("--retry-errors", action="store_true", help="rescore inputs whose row is an error")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from .pipeline import Pipeline

    shard = parse_shard(args.shard)
    everything = collect(args.paths)
    if not everything:
        raise AACScoreError("no radiographs found in " + ", ".join(args.paths))
    names = output_names(everything)
    items = collect(args.paths, shard)
    logging.basicConfig(filename=_log_file(args.out), level=logging.INFO, format="%(asctime)s %(message)s")
    # the segmenter is loaded even when every input brings its label map: QC compares those maps with its view
    pipeline = Pipeline.from_packages(args.scorer, args.segmenter, args.device)
    print(f"Scoring {len(items)} radiograph(s) into {args.out}", file=sys.stderr)
    table = score_cohort(pipeline, items, args.out, names=names, shard=shard, heatmaps=not args.no_heatmap,
                         retry_errors=args.retry_errors, anterior=args.anterior, progress=_ProgressBar())
    print_summary(table)
    return 0


def _log_file(out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    return str(out_dir / "aacscore.log")


def print_summary(table: Path, stream=None) -> None:
    """A short table of the results for the terminal."""
    stream = stream or sys.stdout
    rows = list(ResultsFile(table).values())
    print(f"{'file':40} {'AAC-24':>7}  {'category':9} status", file=stream)
    for row in rows:
        name = Path(row["file"]).name
        print(f"{name[:40]:40} {row['aac24'] or '-':>7}  {row['category'] or '-':9} {row['status']}"
              + (f"  {row['message'][:70]}" if row["message"] else ""), file=stream)
    print(f"results: {table}", file=stream)
