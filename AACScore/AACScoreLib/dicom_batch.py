"""DICOM in a batch run: each scored radiograph's SEG, SR and heatmap written to a folder (`--dicom-out`) and/or
stored back in the PACS it came from (`--store`), and DICOMweb queries as the batch's source of radiographs.

`aacscore score dicomweb+http://HOST/dicom-web --filter Modality=DX,CR --out DIR --store` runs the same resumable
batch as for files: the instances a QIDO-RS query finds become work items keyed by their WADO-RS address (which
holds the SOP Instance UID), the read-ahead thread retrieves them, and the writer thread stores the results.
An instance that is not a projection radiograph (CT, SEG, SR, our own heatmaps) becomes an error row.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import AACScoreError, RadiographError
from .io.cohort import WorkItem
from .io.dicomweb import DicomWebServer, Instance, is_dicomweb, parse_filters


class PacsSource:
    """The instances a DICOMweb query found, as batch work items, with a reader that retrieves them."""

    def __init__(self, server: DicomWebServer, instances: Sequence[Instance]):
        self.server = server
        self.instances = {server.instance_url(instance): instance for instance in instances}
        self._headers: dict[str, object] = {}
        self._lock = threading.Lock()

    def items(self, shard: tuple[int, int] | None = None) -> list[WorkItem]:
        keys = sorted(self.instances)
        if shard is not None:
            keys = keys[shard[0]::shard[1]]
        return [WorkItem(key) for key in keys]

    def names(self) -> dict[str, str]:
        """Output file stems: the SOP Instance UID, unique by definition."""
        return {key: instance.sop for key, instance in self.instances.items()}

    def read(self, key) -> object:
        """Retrieve and decode one instance: a Radiograph, or the RadiographError saying why not (never raises)."""
        from .io.dicom_results import RADIOGRAPH_MODALITIES
        from .io.radiograph import radiograph_from_dataset

        key = str(key)
        instance = self.instances[key]
        if instance.modality and instance.modality not in RADIOGRAPH_MODALITIES:  # known from the query already
            return _not_a_radiograph(key, instance.modality, instance.sop_class)
        try:
            dataset = self.server.retrieve(instance)
            modality = str(dataset.get("Modality", ""))
            if modality not in RADIOGRAPH_MODALITIES:  # for servers whose query did not say
                return _not_a_radiograph(key, modality, str(dataset.get("SOPClassUID", "")))
            radiograph = radiograph_from_dataset(dataset, key)
        except RadiographError as error:
            return error
        except AACScoreError as error:
            return RadiographError(key, str(error))
        with self._lock:
            self._headers[key] = _without_pixels(dataset)
        return radiograph

    def header(self, result) -> object:
        """The retrieved header of a scored instance (kept from `read` for its DICOM outputs)."""
        with self._lock:
            return self._headers.pop(result.radiograph.path)


class DicomOutputs:
    """Makes and delivers a scored radiograph's SEG, SR and heatmap; called on the batch's writer thread."""

    def __init__(self, folder: Path | None = None, server: DicomWebServer | None = None, source=None):
        self.folder = folder
        self.server = server
        self.header = source.header if source is not None else _file_header

    def __call__(self, row: dict, result, stem: str, picture) -> None:
        from .io.dicom_results import make_results, not_dicom_message, write_results

        if result.status == "error":
            return
        if result.radiograph.format != "DICOM":
            note = not_dicom_message(result.radiograph.format)
            row["message"] = "; ".join(m for m in (row.get("message"), note) if m)
            return
        with_heatmap = picture is not None and result.heatmap is not None
        results = make_results(self.header(result), row, result.labels, result.labels_source == "segmenter",
                               np.asarray(picture.convert("RGB")) if with_heatmap else None)
        if self.folder is not None:
            written = write_results(results, self.folder, stem)
            row["dicom"] = "; ".join(str(path) for path in written.values())
        if self.server is not None:
            datasets = results.datasets()
            self.server.store(datasets)
            row["stored"] = "; ".join(f"{kind}={getattr(results, kind).SOPInstanceUID}"
                                      for kind in ("seg", "sr", "heatmap") if getattr(results, kind) is not None)


def _file_header(result) -> object:
    from .io.dicom_results import read_source_header

    return read_source_header(result.radiograph.path)


def _without_pixels(dataset) -> object:
    """A header copy without the pixel data, so that a cohort's retrieved images are not kept in memory."""
    from pydicom.dataset import Dataset

    header = Dataset()
    for element in dataset:
        if element.tag.group < 0x7FE0:
            header.add(element)
    header.file_meta = dataset.file_meta
    return header


def _not_a_radiograph(key: str, modality: str, sop_class: str) -> RadiographError:
    from pydicom.uid import UID

    from .io.dicom_results import RADIOGRAPH_MODALITIES

    name = UID(sop_class).name if sop_class else ""
    kind = f" ({name})" if name and name != sop_class else ""
    return RadiographError(key, f"Modality {modality or 'unknown'}{kind} is not a projection radiograph "
                                f"(expected {', '.join(RADIOGRAPH_MODALITIES)})")


def add_arguments(parser) -> None:
    """The DICOM options of `aacscore score`."""
    parser.add_argument("--dicom-out", type=Path, metavar="DIR",
                        help="also write each DICOM radiograph's SEG (L1-L5), SR (TID 1500 report) and heatmap "
                             "(Secondary Capture) into DIR")
    parser.add_argument("--filter", action="append", default=[], metavar="KEYWORD=V[,V]",
                        help="DICOMweb source: QIDO-RS match, e.g. Modality=DX,CR (repeatable)")
    parser.add_argument("--store", action="store_true",
                        help="DICOMweb source: store the SEG, SR and heatmap back on the server (STOW-RS)")
    parser.add_argument("--user", help="DICOMweb basic authentication user; the password is read from "
                                       "$AACSCORE_DICOMWEB_PASSWORD (or asked for on a terminal)")
    parser.add_argument("--token", action="store_true",
                        help="DICOMweb bearer token authentication, the token read from $AACSCORE_DICOMWEB_TOKEN")


def pacs_source(args) -> PacsSource | None:
    """The DICOMweb source the command names (queried now), or None for files; refuses mixing the two."""
    servers = [path for path in args.paths if is_dicomweb(path)]
    if not servers:
        if args.store or args.filter or args.user or args.token:
            raise AACScoreError("--store, --filter, --user and --token need a dicomweb+http(s):// source")
        return None
    if len(args.paths) != 1:
        raise AACScoreError("give one DICOMweb server and no files: " + " ".join(args.paths))
    server = DicomWebServer.from_options(servers[0], args.user, args.token)
    return PacsSource(server, server.find(parse_filters(args.filter)))


def dicom_outputs(args, source: PacsSource | None) -> DicomOutputs | None:
    if args.dicom_out is None and not args.store:
        return None
    return DicomOutputs(args.dicom_out, source.server if source is not None and args.store else None, source)


def verify_stored(server: DicomWebServer, table: Path) -> dict[str, object]:
    """Query back what a `--store` run stored and compare it with its results table: every scored row's SEG
    (labels pixel for pixel with its label map) and SR (scores to 3 decimals, category, QC, models).

    Returns counts and the problems found, one line each; reading goes through highdicom, whose template and
    IOD checks are the validation the objects get.
    """
    from PIL import Image

    from .io.dicom_results import read_report
    from .io.labelmaps import read_dicom_seg
    from .io.results_file import ResultsFile, format_cell

    counts = {"scored": 0, "stored": 0, "seg_equal": 0, "sr_equal": 0}
    problems: list[str] = []
    for row in ResultsFile(table).values():
        if row["status"] == "error":
            continue
        counts["scored"] += 1
        name = row["file"].rsplit("/", 1)[-1]
        stored = dict(part.split("=", 1) for part in row.get("stored", "").split("; ") if "=" in part)
        found = {kind: server.find([{"SOPInstanceUID": uid}]) for kind, uid in stored.items()}
        if set(stored) < {"seg", "sr"} or any(len(instances) != 1 for instances in found.values()):
            problems.append(f"{name}: stored {sorted(stored)}, found {[len(i) for i in found.values()]} on the server")
            continue
        counts["stored"] += 1
        labels = read_dicom_seg(server.retrieve(found["seg"][0]), source_uid=name)
        if np.array_equal(labels, np.asarray(Image.open(row["labels"]))):
            counts["seg_equal"] += 1
        else:
            problems.append(f"{name}: the stored SEG differs from {row['labels']}")
        values = read_report(server.retrieve(found["sr"][0]))
        different = [column for column, value in values.items()
                     if column in row and row[column] != (format_cell(value) if isinstance(value, float) else value)]
        if different or values.get("source_uid") != name:
            problems.append(f"{name}: the stored SR differs in {different or ['source image']}")
        else:
            counts["sr_equal"] += 1
    return {**counts, "problems": problems}
