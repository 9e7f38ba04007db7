"""`aacscore score`: run the pipeline over a cohort, resumable, shardable, one results row per input.

Models are loaded once; the next radiograph is read on a second thread while the current one is scored. Each
finished image gets its label map and heatmap overlay written atomically and its row added to results.csv, so
an interruption loses nothing already done and a rerun continues where it stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from . import dicom_batch
from .cli import say
from .io.checksums import sha256_or_empty
from .io.cohort import WorkItem, collect, parse_shard, real_path, unique_output_names
from .errors import AACScoreError, Cancelled, OutputBusy, OutputError, RadiographError
from .io.labelmaps import write_label_png
from .io.overlay import render_overlay, save_overlay
from .io.radiograph import read_or_error
from .io.results_file import ResultsFile

log = logging.getLogger(__name__)


RUN_LOCK = ".run.lock"
MERGE_LOCK = ".results.lock"
RETIRED = "retired"


def results_path(out_dir: Path, shard: tuple[int, int] | None) -> Path:
    if shard is None:
        return out_dir / "results.csv"
    return out_dir / "shards" / f"results-{shard[0]:04d}-of-{shard[1]:04d}.csv"


def check_out_dir(out_dir: Path) -> None:
    """Refuse an --out that cannot be a folder, before anything is read or created."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a folder; --out needs a folder")
    parent = next((p for p in [out_dir, *out_dir.parents] if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise OutputError(f"{out_dir}: cannot be created, {parent} is a file")


def make_out_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"{out_dir}: cannot create the output folder ({error.strerror or error})") from None


@contextlib.contextmanager
def run_lock(out_dir: Path, shard: tuple[int, int] | None) -> Iterator[None]:
    """One run at a time in a folder: an unsharded run holds its lock alone, the shards of a job array share it
    (each also holding its own shard's lock). flock locks go with the process, so a killed run frees them."""
    make_out_dir(out_dir)
    locks = [(out_dir / RUN_LOCK, fcntl.LOCK_EX if shard is None else fcntl.LOCK_SH)]
    if shard is not None:
        make_out_dir(out_dir / "shards")
        locks.append((out_dir / "shards" / f".results-{shard[0]:04d}-of-{shard[1]:04d}.lock", fcntl.LOCK_EX))
    handles = []
    try:
        for path, mode in locks:
            handles.append(_open_for_lock(path))
            try:
                fcntl.flock(handles[-1], mode | fcntl.LOCK_NB)
            except BlockingIOError:
                what = f"shard {shard[0]}/{shard[1]}" if path.parent.name == "shards" else "this folder"
                raise OutputBusy(f"{out_dir}: another aacscore run is scoring {what} (it holds {path}); "
                                 "wait for it to finish, or give another --out") from None
        yield
    finally:
        for handle in handles:
            os.close(handle)


def _open_for_lock(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:
        raise OutputError(f"{path}: cannot be created ({error.strerror or error}); is --out writable?") from None


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
    read: Callable[[object], object] = read_or_error,
    dicom: Callable[[dict, object, str, object], None] | None = None,
) -> Path:
    """Score `items` into `out_dir`; returns the results table's path. Already scored inputs are skipped.

    `read` turns an item's image into a Radiograph or a RadiographError (a file reader, or a PACS retrieval);
    `dicom(row, result, stem, overlay picture)` makes DICOM outputs beside the label map and overlay.
    Raises OutputBusy when another run is scoring into `out_dir` (shards of one job array run side by side)."""
    out_dir = Path(out_dir)
    names = names or unique_output_names(items)
    table_path = results_path(out_dir, shard)
    with run_lock(out_dir, shard):
        if shard is None:
            merge_shards(out_dir, None)  # rows of earlier sharded runs join results.csv before this run adds its own
        _score_into(pipeline, items, out_dir, names, shard, heatmaps, retry_errors, anterior, progress, cancel,
                    read, dicom)
        if shard is not None:
            merge_shards(out_dir, shard[1])
    return table_path


def _score_into(pipeline, items, out_dir, names, shard, heatmaps, retry_errors, anterior, progress, cancel,
                read, dicom) -> None:
    merged = ResultsFile(out_dir / "results.csv") if shard is not None else None
    with ResultsFile(results_path(out_dir, shard)) as results, ThreadPoolExecutor(max_workers=1) as writer:
        _recognise_moved(items, results, merged)
        todo = [item for item in items
                if not any(table.done(item.image, retry_errors, pipeline.models) for table in (results, merged)
                           if table is not None)]
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
            for done, (item, radiograph, digest) in enumerate(_read_ahead(todo, read), start=1):
                if cancel is not None and cancel():
                    raise Cancelled(f"cancelled after {done - 1} of {len(todo)} radiographs")
                row, result = _score_one(pipeline, item, radiograph, heatmaps, anterior)
                row["file_sha256"] = digest
                if pending is not None:
                    finish(pending)
                    pending = None
                pending = writer.submit(write_outputs, row, result, out_dir, names[item.image], dicom)
        finally:  # also on a cancel or an interrupt: the last finished image keeps its row
            if pending is not None:
                finish(pending)


def _recognise_moved(items: Sequence[WorkItem], results: ResultsFile, merged: ResultsFile | None) -> None:
    """An input found at a new path with the content of a row whose file is gone takes that row over: it is not
    scored again (the content hash is only computed when some row's file is gone)."""
    tables = [(table, table.moved()) for table in (results, merged) if table is not None]
    if not any(moved for _, moved in tables):
        return
    for item in items:
        key = real_path(item.image)
        if any(key in table.rows for table, _ in tables):
            continue
        digest = sha256_or_empty(item.image)
        for table, moved in tables:
            old_key = moved.pop(digest, None) if digest else None
            if old_key is not None:
                row = results.rows.pop(old_key, None) or table.rows[old_key]
                results.add({**row, "file": key})
                break


def merge_shards(out_dir: str | Path, shard_count: int | None = None) -> Path:
    """Join the shards' tables into out_dir/results.csv (under a lock, so the last shard to finish sees all).

    Tables of `shard_count` shards are this job's and win; tables from runs with another shard count (or every
    one, when `shard_count` is None: an unsharded run) only add rows results.csv lacks, then move to
    shards/retired/, so a rerun with another count is never overruled by stale rows."""
    out_dir = Path(out_dir)
    merged = out_dir / "results.csv"
    shards = out_dir / "shards"
    with open(out_dir / MERGE_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = ResultsFile(merged)
        current, stale = [], []
        for shard_file in sorted(shards.glob("results-*.csv")):
            count = shard_file.stem.rpartition("-of-")[2]
            (current if shard_count is not None and count == f"{shard_count:04d}" else stale).append(shard_file)
        if not current and not stale:
            return merged
        for shard_file in stale:
            for row in ResultsFile(shard_file).values():
                if not table.done(row["file"]):
                    table.add(row)
        now_scored = set()
        for shard_file in current:
            for row in ResultsFile(shard_file).values():
                table.add(row)
                now_scored.add(row["file_sha256"])
        table.forget(key for digest, key in table.moved().items() if digest in now_scored)  # moved inputs' old rows
        table.save()
        for shard_file in stale:
            (shards / RETIRED).mkdir(exist_ok=True)
            os.replace(shard_file, shards / RETIRED / shard_file.name)
    return merged


def _read_ahead(items: Sequence[WorkItem], read=read_or_error) -> Iterable[tuple[WorkItem, object, str]]:
    """Yield (item, Radiograph or RadiographError, file sha256) with the next input read on a worker thread."""
    with ThreadPoolExecutor(max_workers=1) as reader:
        futures: list[Future] = [reader.submit(_read_and_hash, read, item.image) for item in items[:2]]
        for index, item in enumerate(items):
            radiograph, digest = futures[index].result()
            if index + 2 < len(items):
                futures.append(reader.submit(_read_and_hash, read, items[index + 2].image))
            futures[index] = None  # free the pixels once used
            yield item, radiograph, digest


def _read_and_hash(read, image: Path | str) -> tuple[object, str]:
    """An input read, with the sha256 of its file (none for an instance on a PACS: its address is its key)."""
    return read(image), "" if isinstance(image, str) and "://" in image else sha256_or_empty(image)


def _score_one(pipeline, item: WorkItem, radiograph, heatmaps: bool, anterior) -> tuple[dict, object]:
    """(row, pipeline result or None): never raises for a bad image, only for a cancel."""
    start = time.perf_counter()
    result = None
    if isinstance(radiograph, RadiographError):
        row = {"file": real_path(item.image), "status": "error", "message": str(radiograph)}
    else:
        try:
            result = pipeline.run(radiograph, item.labels, anterior=anterior, heatmap=heatmaps)
            row = result.record()
            row["file"] = real_path(item.image)
        except Cancelled:
            raise
        except Exception as error:  # one image's failure must never stop the cohort or lose written rows
            row = _internal_error(item.image, error)
    row["seconds"] = round(time.perf_counter() - start, 3)
    row["models"] = pipeline.models
    return row, result


def write_outputs(row: dict, result, out_dir: Path, stem: str, dicom=None) -> dict:
    """Write the label map and the overlay of a scored image (on the writer thread); returns the row."""
    if result is None:
        return row
    try:
        picture = None
        if result.labels is not None:
            row["labels"] = str(write_label_png(out_dir / "labels" / f"{stem}_labels.png", result.labels))
        if result.status != "error":
            title = f"{Path(row['file']).name}  AAC-24 {result.aac24:.1f} ({result.category})"
            if result.heatmap_all_zero:
                title += "  heatmap: all zero"
            picture = render_overlay(result.radiograph.pixels, result.heatmap, result.labels, result.geometry,
                                     title, result.category)
            row["heatmap"] = str(save_overlay(out_dir / "overlays" / f"{stem}_heatmap.png", picture))
        if dicom is not None:
            dicom(row, result, stem, picture)
    except Exception as error:  # a full disk or a bad picture loses this image's files, not the cohort
        return {**_internal_error(Path(row["file"]), error), "seconds": row.get("seconds"),
                "file_sha256": row.get("file_sha256")}
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
        self.stream = say(line[:150].ljust(80 if self.stream.isatty() else 0), self.stream, end)


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
    dicom_batch.add_arguments(parser)
    parser.set_defaults(func=_run)


def _run(args) -> int:
    from .pipeline import Pipeline

    shard = parse_shard(args.shard)
    check_out_dir(args.out)
    pacs = dicom_batch.pacs_source(args)
    everything = pacs.items() if pacs else collect(args.paths)
    if not everything:
        raise AACScoreError("no radiographs found in " + ", ".join(args.paths))
    names = pacs.names() if pacs else unique_output_names(everything)
    items = pacs.items(shard) if pacs else collect(args.paths, shard)
    # the segmenter is loaded even when every input brings its label map: QC compares those maps with its view
    pipeline = Pipeline.from_packages(args.scorer, args.segmenter, args.device)
    make_out_dir(args.out)  # only now: a refused run leaves no folder behind
    try:
        logging.basicConfig(filename=args.out / "aacscore.log", level=logging.INFO, format="%(asctime)s %(message)s")
    except OSError as error:
        raise OutputError(f"{args.out / 'aacscore.log'}: cannot be written ({error.strerror or error})") from None
    logging.captureWarnings(True)  # library warnings go to the log, not between the progress lines
    say(f"Scoring {len(items)} radiograph(s) into {args.out}")
    table = score_cohort(pipeline, items, args.out, names=names, shard=shard, heatmaps=not args.no_heatmap,
                         retry_errors=args.retry_errors, anterior=args.anterior, progress=_ProgressBar(),
                         read=pacs.read if pacs else read_or_error, dicom=dicom_batch.dicom_outputs(args, pacs))
    print_summary(table)
    return 0


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
