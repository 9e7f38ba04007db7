"""The worker process: `python -m AACScoreLib.worker.server`, started by `client.WorkerClient`.

It reads job and cancel messages on stdin (see `protocol`), runs one job at a time on a job thread while the
main thread keeps reading (so a cancel arrives during a job), and writes progress and results on stdout. The
loaded pipeline is kept between jobs with the same models and device. Whatever a library prints goes to stderr:
stdout carries only the protocol. Ends on `{"quit": true}` or when stdin closes (its client went away).
"""

from __future__ import annotations

import json
import os
import platform
import queue
import sys
import threading
import traceback
from pathlib import Path
from typing import Callable, TextIO

import numpy as np

from ..errors import AACScoreError, Cancelled, RadiographError
from ..pipeline import AACResult
from .protocol import END_EVENTS, JOB_KINDS, PROTOCOL_VERSION, VolumeImage, decode, encode, result_message


class _Context:
    """What a running job may do: report progress, deliver an item, and ask whether it was cancelled."""

    def __init__(self, job_id: str, cancel_event: threading.Event, send: Callable[[dict], None]):
        self.job_id = job_id
        self.cancel_event = cancel_event
        self._send = send
        self.loaded_models = False

    def progress(self, fraction: float, text: str) -> None:
        self._send({"job": self.job_id, "event": "progress", "fraction": float(fraction), "text": text})

    def deliver(self, item: dict) -> None:
        self._send({"job": self.job_id, "event": "item", "item": item})

    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def check(self) -> None:
        if self.cancelled():
            raise Cancelled("cancelled by the user")


class Server:
    def __init__(self, out: TextIO):
        self._out = out
        self._write_lock = threading.Lock()
        self._jobs: queue.Queue = queue.Queue()
        self._cancel_events: dict[str, threading.Event] = {}
        self._pipeline = None
        self._pipeline_key: str | None = None

    def send(self, message: dict) -> None:
        with self._write_lock:
            self._out.write(encode(message))
            self._out.flush()

    def serve(self, stdin: TextIO) -> None:
        self.send({"event": "ready", "protocol": PROTOCOL_VERSION, "pid": os.getpid(),
                   "python": platform.python_version(), "executable": sys.executable})
        runner = threading.Thread(target=self._run_jobs, name="AACScore worker job", daemon=True)
        runner.start()
        for line in stdin:
            message = decode(line)
            if message is None:
                continue
            if message.get("quit"):
                break
            if "cancel" in message:
                event = self._cancel_events.get(str(message["cancel"]))
                if event is not None:
                    event.set()
            elif "job" in message:
                self._cancel_events[str(message["job"])] = threading.Event()
                self._jobs.put(message)
        self._jobs.put(None)

    def _run_jobs(self) -> None:
        while (message := self._jobs.get()) is not None:
            self._run(message)

    def _run(self, message: dict) -> None:
        job_id = str(message["job"])
        context = _Context(job_id, self._cancel_events[job_id], self.send)
        end: dict = {"job": job_id}
        try:
            kind = message.get("kind")
            if kind not in JOB_KINDS:
                raise AACScoreError(f"unknown job kind {kind!r}; this worker runs {', '.join(JOB_KINDS)}")
            result = getattr(self, f"_{kind}")(message.get("params") or {}, Path(message["folder"]), context)
            end.update(event="cancelled" if context.cancelled() else "done", result=result)
        except Exception as error:  # noqa: BLE001 - every failure goes back to the client as a message
            if context.cancelled() or isinstance(error, Cancelled):
                end.update(event="cancelled")
            else:
                known = isinstance(error, AACScoreError)
                end.update(event="error", message=str(error) if known else f"{type(error).__name__}: {error}",
                           details="" if known else traceback.format_exc())
        end["loaded_models"] = context.loaded_models
        assert end["event"] in END_EVENTS
        self._cancel_events.pop(job_id, None)
        self.send(end)

    # -- the models, kept between jobs

    def pipeline(self, models: dict, context: _Context):
        key = json.dumps(models, sort_keys=True)
        if self._pipeline is None or key != self._pipeline_key:
            from ..devices import device_choice
            from ..pipeline import Pipeline

            context.progress(0.0, "loading the models")
            self._pipeline = None  # free the old models before loading others
            device, _ = device_choice(models.get("device") or "auto")
            self._pipeline = Pipeline.from_packages(models.get("scorer"), models.get("segmenter"), device,
                                                    models.get("models_dir"))
            self._pipeline_key = key
            context.loaded_models = True
        return self._pipeline

    # -- jobs

    def _probe(self, params: dict, folder: Path, context: _Context) -> dict:
        """Python, torch and the device this worker would use (a broken torch is reported, not raised)."""
        answer = {"python": platform.python_version(), "executable": sys.executable, "torch": None}
        try:
            import torch

            from ..devices import device_choice

            answer["torch"] = torch.__version__
            answer["device"], answer["message"] = device_choice(params.get("device") or "auto")
        except Exception as error:  # noqa: BLE001 - e.g. an OSError from a DLL that does not load
            answer["device"], answer["message"] = None, f"PyTorch cannot be used here: {type(error).__name__}: {error}"
        return answer

    def _segment(self, params: dict, folder: Path, context: _Context) -> dict:
        segmenter = self.pipeline(params["models"], context).segmenter
        if segmenter is None:
            raise AACScoreError("no segmenter model is loaded; install one under Settings")
        context.progress(0.1, "segmenting vertebrae")
        image = VolumeImage.from_message(params["image"]).load()
        result = segmenter.segment(image, progress=context.progress, cancel=context.cancelled)
        context.check()
        labels = folder / "segment_labels.nrrd"
        write_nrrd(labels, np.asarray(result.labels, np.uint8))
        answer = {"labels": str(labels), "status": result.status, "message": result.message or "", "context": None}
        if result.context is not None:
            answer["context"] = str(folder / "segment_context.nrrd")
            write_nrrd(Path(answer["context"]), np.asarray(result.context, np.uint8))
        return answer

    def _score(self, params: dict, folder: Path, context: _Context) -> dict:
        pipeline = self.pipeline(params["models"], context)
        image = VolumeImage.from_message(params["image"]).load()
        labels = np.load(params["labels"]) if params.get("labels") else None
        result = pipeline.run(image, labels, heatmap=bool(params.get("heatmap", True)), progress=context.progress,
                              cancel=context.cancelled)
        return result_message(result, folder, "score", write_nrrd)

    def _batch(self, params: dict, folder: Path, context: _Context) -> dict:
        """Score each image in turn, delivering each result as it finishes; a cancel keeps what is done."""
        pipeline = self.pipeline(params["models"], context)
        images = params["images"]
        for index, spec in enumerate(images):
            context.check()
            image = VolumeImage.from_message(spec)

            def step(fraction: float, text: str, index=index, name=image.name) -> None:
                context.progress((index + fraction) / len(images), f"{index + 1}/{len(images)} {name}: {text}")

            try:
                result = pipeline.run(image.load(), heatmap=bool(params.get("heatmap", True)), progress=step,
                                      cancel=context.cancelled)
            except RadiographError as error:  # the file changed since it was loaded: an error row, go on
                result = AACResult(file=image.key, status="error", message=str(error))
            context.deliver({"index": index, "result": result_message(result, folder, f"item{index:05d}",
                                                                      write_nrrd)})
        context.progress(1.0, f"{len(images)} radiographs scored")
        return {"count": len(images)}

    def _install_model(self, params: dict, folder: Path, context: _Context) -> dict:
        from ..models import install_model

        def progress(done: int, total: int | None) -> None:
            context.check()  # raising from the progress callback stops a download
            context.progress(done / total if total else 0.0, f"{done / 1e6:.1f} MB")

        package = install_model(params["path"], models_dir=params.get("models_dir"), progress=progress)
        return {"kind": package.kind, "name": package.name, "version": package.version, "path": str(package.path)}

    def _finetune(self, params: dict, folder: Path, context: _Context) -> dict:
        """Fine-tune a package on a training set (finetune.py); the scorer reports and checks cancel every epoch,
        nnU-Net's loop does not, so a cancelled segmenter fine-tuning ends when the client kills the worker."""
        from ..finetune import ScorerFinetuneSettings, SegmenterFinetuneSettings, finetune_scorer, finetune_segmenter

        kind, options = params["kind"], params.get("settings") or {}
        context.progress(0.0, f"fine-tuning the {kind}")
        if kind == "scorer":
            settings = ScorerFinetuneSettings(**options)

            def epoch_done(epoch: int, entry: dict) -> None:
                context.progress(epoch / settings.epochs, f"epoch {epoch}/{settings.epochs}, loss {entry['train_loss']:.3f}")
                context.check()

            package = finetune_scorer(params["data"], params["out"], params.get("base"), settings,
                                      log=_to_stderr, on_epoch_end=epoch_done)
        elif kind == "segmenter":
            package = finetune_segmenter(params["data"], params["out"], params.get("base"),
                                         SegmenterFinetuneSettings(**options), log=_to_stderr)
        else:
            raise AACScoreError(f"fine-tuning kind must be segmenter or scorer, got {kind!r}")
        return {"kind": kind, "path": str(package)}


def _to_stderr(text: str) -> None:
    """A job's log: stderr, because stdout carries the protocol's JSON lines."""
    print(text, file=sys.stderr)


def write_nrrd(path: Path, array: np.ndarray) -> None:
    """A 2D array (rows, columns) as a raw NRRD that Slicer reads as a one-slice volume."""
    import nrrd

    nrrd.write(str(path), np.ascontiguousarray(array), {"encoding": "raw"}, index_order="C")


def main() -> int:
    protocol_out = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a library's print goes to stderr, never into the protocol
    sys.stdout = sys.stderr
    Server(protocol_out).serve(sys.stdin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
