"""3D Slicer module AACScore: a thin panel over AACScoreLib, which holds every behaviour.

The widget binds the panel to `AACScoreLib.slicer.workflow.Workflow` (tested headless against slicer-core's scene):
it prepares work from the scene, sends the compute part to the worker process (`AACScoreLib.worker`: PythonSlicer
running the models, which stay loaded between jobs), polls it with a qt.QTimer through a `JobPoller` (the pressed
button turns into Cancel), and applies the results to the scene on the main thread. torch and nnU-Net are never
imported into Slicer's own process.

This file also runs in Slicers whose Python is too old for AACScore (5.6 and 5.8 run Python 3.9): there it only
shows why, so it keeps to Python 3.9 syntax.
"""

from __future__ import annotations

import logging
import os
import traceback
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
TERMINOLOGY_FILE = os.path.join(MODULE_DIR, "Resources", "AACScore.term.json")
SUBSCORE_COLUMNS = ("L1A", "L1P", "L2A", "L2P", "L3A", "L3P", "L4A", "L4P")  # as AACScoreLib.kauppila


class AACScore(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "AAC Score"
        self.parent.categories = ["Quantification"]
        self.parent.dependencies = ["Segmentations", "Terminologies"]
        self.parent.contributors = ["AACScore developers"]
        self.parent.helpText = (
            "Scores abdominal aortic calcification (Kauppila AAC-24) on lateral lumbar radiographs: "
            "segment L1-L5, correct the segments, score, and see a Grad-CAM heatmap. "
            "The bundled demo models were trained on synthetic phantoms and are not for clinical use."
        )
        self.parent.acknowledgementText = (
            "Method after Shao et al. 2025, Front Cardiovasc Med 12:1647882 (nnU-Net segmentation and an "
            "scSE-ResNet34 regression model)."
        )
        slicer.app.connect("startupCompleted()", registerResources)


_resourcesRegistered = False


def registerResources():
    """Terminology of L1-L5 for the Segment Editor, and the demo radiographs in Sample Data.

    Called at startup and again when the panel opens (a module added after startup never sees the
    startupCompleted signal); registers once.
    """
    global _resourcesRegistered
    if _resourcesRegistered:
        return
    _resourcesRegistered = True
    try:
        slicer.modules.terminologies.logic().LoadContextFromFile(TERMINOLOGY_FILE)
    except Exception:  # noqa: BLE001 - startup must go on; the segments still carry their codes
        logging.exception("AACScore: could not load the terminology %s", TERMINOLOGY_FILE)
    try:
        import SampleData

        from AACScoreLib.slicer import sample_data

        sample_data.register(SampleData.SampleDataLogic)
    except Exception:  # noqa: BLE001
        logging.exception("AACScore: could not register the sample radiographs")


@parameterNodeWrapper
class AACScoreParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    heatmapOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    showContext: bool = False  # the hidden T12/S1 segments of a segmenter with context classes
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    scorerModel: str = ""  # package path; "" = newest installed, else the bundled demo
    segmenterModel: str = ""
    raterName: str = ""
    workerPython: str = ""  # "" = Slicer's own PythonSlicer
    trainingSetFolder: str = ""


class AACScoreWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._poller = None
        self._jobButton = None
        self._jobButtonText = ""
        self._onDone = None
        self._sceneGeneration = 0
        self._dependenciesReady = False
        self._unsupported = None
        self._shownVolumeId = None
        self._probe = None
        self._probedDevice = None
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._pollJobs)

    # -- set-up

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AACScore.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = AACScoreLogic()
        registerResources()

        from AACScoreLib.slicer import dependencies

        self._unsupported = dependencies.unsupported_python()
        if self._unsupported:  # Slicer 5.6/5.8: say why, instead of buttons that stay grey without a reason
            self.ui.versionMessageLabel.text = self._unsupported
            self.ui.versionMessageLabel.visible = True
            for button in self._actionButtons() + [self.ui.installDependenciesButton, self.ui.checkDependenciesButton]:
                button.enabled = False
                button.toolTip = self._unsupported
            return

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.loadFilesButton.connect("clicked(bool)", self.onLoadFiles)
        self.ui.loadFolderButton.connect("clicked(bool)", self.onLoadFolder)
        self.ui.dicomButton.connect("clicked(bool)", lambda: slicer.util.selectModule("DICOM"))
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.editButton.connect("clicked(bool)", self.onEditSegments)
        self.ui.scoreButton.connect("clicked(bool)", self.onScore)
        self.ui.scoreAllButton.connect("clicked(bool)", self.onScoreAll)
        self.ui.scoreFolderButton.connect("clicked(bool)", self.onScoreFolder)
        self.ui.nextToReviewButton.connect("clicked(bool)", self.onNextToReview)
        self.ui.exportCsvButton.connect("clicked(bool)", self.onExportCsv)
        self.ui.exportDicomButton.connect("clicked(bool)", self.onExportDicom)
        self.ui.loadDicomSegButton.connect("clicked(bool)", self.onLoadDicomSeg)
        self.ui.saveRatingButton.connect("clicked(bool)", self.onSaveRating)
        self.ui.agreementButton.connect("clicked(bool)", self.onAgreement)
        self.ui.installModelButton.connect("clicked(bool)", self.onInstallModel)
        self.ui.trainingSetBrowseButton.connect("clicked(bool)", self.onBrowseTrainingSet)
        self.ui.addToTrainingSetButton.connect("clicked(bool)", self.onAddToTrainingSet)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetune)
        self.ui.verifyModelsButton.connect("clicked(bool)", self.onVerifyModels)
        self.ui.checkDependenciesButton.connect("clicked(bool)", self.checkDependencies)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.scorerModelComboBox.connect("currentIndexChanged(int)", self._onModelChosen)
        self.ui.segmenterModelComboBox.connect("currentIndexChanged(int)", self._onModelChosen)
        for spinBox in self._raterSpinBoxes():
            spinBox.connect("valueChanged(int)", self._updateRaterTotal)

        self.initializeParameterNode()
        if self.checkDependencies():
            self._refreshModels()
            self._updateFromParameterNode()

    def cleanup(self):
        if self._job is not None:
            self._job.cancel()
        self._timer.stop()
        self.removeObservers()
        self._disconnectParameterNode()
        if self.logic is not None:
            self.logic.stopWorker()

    def enter(self):
        if not self._unsupported:
            self.initializeParameterNode()

    def exit(self):
        self._disconnectParameterNode()

    def onSceneStartClose(self, caller, event):
        """The scene goes: a running job is cancelled and whatever it still delivers is dropped."""
        self._sceneGeneration += 1
        if self._job is not None:
            self._job.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        self._shownVolumeId = None
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node (as Slicer's module template)

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            from AACScoreLib.slicer.workflow import radiograph_volumes

            volumes = radiograph_volumes(slicer.mrmlScene)
            if volumes:
                self._parameterNode.inputVolume = volumes[0]
        self._showTrainingSetCount()

    def setParameterNode(self, inputParameterNode):
        self._disconnectParameterNode()
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateFromParameterNode)
            self._updateFromParameterNode()

    def _disconnectParameterNode(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateFromParameterNode)

    def _updateFromParameterNode(self, caller=None, event=None):
        parameters = self._parameterNode
        volume = parameters.inputVolume if parameters else None
        idle = self._job is None and self._dependenciesReady
        for button in (self.ui.segmentButton, self.ui.scoreButton, self.ui.saveRatingButton, self.ui.editButton):
            if button is not self._jobButton:
                button.enabled = idle and volume is not None
        if not self._dependenciesReady or parameters is None:
            return
        self.logic.setWorkerPython(parameters.workerPython)
        volumeId = volume.GetID() if volume is not None else None
        if volumeId != self._shownVolumeId:  # another radiograph: its own segmentation and ratings
            self._shownVolumeId = volumeId
            self._onVolumeChanged(volume)
        from AACScoreLib.slicer import scene as aac_scene

        aac_scene.set_heatmap_opacity(slicer.mrmlScene, parameters.heatmapOpacity)
        if parameters.segmentation is not None:
            aac_scene.show_context_segments(parameters.segmentation, parameters.showContext)
        self._showStoredResult()
        self._probeDevice()

    def _onVolumeChanged(self, volume):
        """Another radiograph chosen: select its segmentation, show it with its heatmap, load the rating."""
        from AACScoreLib.slicer import scene as aac_scene
        from AACScoreLib.slicer.workflow import find_heatmap

        found = aac_scene.find_vertebra_segmentation(slicer.mrmlScene, volume) if volume is not None else None
        if found is not None or self._parameterNode.segmentation is not None:
            self._parameterNode.segmentation = found
        if volume is not None:
            slicer.util.setSliceViewerLayers(background=volume, foreground=find_heatmap(slicer.mrmlScene, volume),
                                             foregroundOpacity=self._parameterNode.heatmapOpacity, fit=True)
        self._showRating()

    # -- jobs: the pressed button becomes Cancel; every other action waits

    def _run(self, button, job, onDone=None, onItem=None, runsWhenCancelled=False):
        """Poll `job` (a WorkerJob, or a Job on a thread); `onItem(item)` applies each delivered item and
        `onDone(job)` the end (after a cancel too when `runsWhenCancelled`)."""
        from AACScoreLib.slicer.workflow import JobPoller

        generation = self._sceneGeneration

        def applyItem(item):
            if generation == self._sceneGeneration:  # not into a scene opened after the job started
                onItem(item)

        self._job = job
        self._poller = JobPoller(job, applyItem if onItem is not None else None)
        self._jobButton, self._jobButtonText = button, button.text
        self._onDone = (onDone, runsWhenCancelled, generation)
        button.text = "Cancel"
        button.enabled = True
        self._setBusy(True)
        self.ui.progressBar.value = 0
        self.ui.progressBar.visible = True
        self._timer.start()

    def _cancelRunningJob(self):
        """True when a job was running (the click meant Cancel)."""
        if self._job is None:
            return False
        self._job.cancel()
        self.ui.statusLabel.text = "Cancelling…"
        self._jobButton.enabled = False
        return True

    def _pollJobs(self):
        for line in self.logic.takeWorkerLog():
            logging.info("AACScore worker: %s", line)
        self._pollProbe()
        poller = self._poller
        if poller is None:
            if self._probe is None:
                self._timer.stop()
            return
        done = poller.poll()
        self.ui.progressBar.value = int(round(100 * poller.fraction))
        self.ui.statusLabel.text = poller.text
        if not done:
            return
        job = self._job
        onDone, runsWhenCancelled, generation = self._onDone
        self._job, self._poller, self._onDone = None, None, None  # before any dialog: its event loop polls too
        self._jobButton.text = self._jobButtonText
        self._jobButton = None
        self.ui.progressBar.visible = False
        self._setBusy(False)
        self.checkDependencies()  # sets every button as the packages and the chosen radiograph allow
        if poller.problems:
            slicer.util.warningDisplay(f"{len(poller.problems)} result(s) could not be put into the scene.",
                                       detailedText="\n".join(poller.problems))
        if job.error is not None:
            self.ui.statusLabel.text = "Failed."
            details = getattr(job.error, "details", "") or "".join(
                traceback.format_exception(type(job.error), job.error, job.error.__traceback__))
            slicer.util.errorDisplay(str(job.error), detailedText=details)
            return
        if generation != self._sceneGeneration:
            self.ui.statusLabel.text = "The scene was closed; the job's results were dropped."
            return
        if job.cancelled:
            self.ui.statusLabel.text = "Cancelled."
            if not runsWhenCancelled:
                return
        if onDone is not None:
            with slicer.util.tryWithErrorDisplay("Could not put the result into the scene.", waitCursor=True):
                onDone(job)

    def _actionButtons(self):
        return [self.ui.loadFilesButton, self.ui.loadFolderButton, self.ui.dicomButton, self.ui.segmentButton,
                self.ui.editButton, self.ui.scoreButton, self.ui.scoreAllButton, self.ui.scoreFolderButton,
                self.ui.nextToReviewButton, self.ui.installModelButton, self.ui.verifyModelsButton,
                self.ui.saveRatingButton, self.ui.agreementButton, self.ui.exportCsvButton,
                self.ui.exportDicomButton, self.ui.loadDicomSegButton,
                self.ui.addToTrainingSetButton, self.ui.finetuneButton, self.ui.trainingSetBrowseButton]

    def _setBusy(self, busy):
        """While a job runs, nothing else can start and the choices it was started with cannot change."""
        for widget in self._actionButtons() + [
                self.ui.inputVolumeSelector, self.ui.segmentationSelector, self.ui.deviceComboBox,
                self.ui.scorerModelComboBox, self.ui.segmenterModelComboBox, self.ui.workerPythonLineEdit,
                self.ui.installDependenciesButton, self.ui.checkDependenciesButton]:
            if widget is not self._jobButton:
                widget.enabled = not busy and (self._dependenciesReady or widget in (
                    self.ui.installDependenciesButton, self.ui.checkDependenciesButton, self.ui.dicomButton))

    # -- loading

    def onLoadFiles(self):
        paths = qt.QFileDialog.getOpenFileNames(
            slicer.util.mainWindow(), "Load radiographs", "",
            "Radiographs (*.dcm *.dicom *.ima *.png *.jpg *.jpeg *.tif *.tiff *.nrrd *.nii *.nii.gz);;All files (*)")
        if paths:
            self._load(self.ui.loadFilesButton, list(paths))

    def onLoadFolder(self):
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Load every radiograph in a folder")
        if folder:
            self._load(self.ui.loadFolderButton, [folder])

    def _load(self, button, paths, then=None):
        """Read the files on a thread (pydicom and Pillow only), add each as a volume here; then `then(volumes)`."""
        if self._cancelRunningJob():
            return
        from AACScoreLib.slicer.workflow import Job, radiograph_files, read_work

        files = []
        with slicer.util.tryWithErrorDisplay("Could not list the radiographs.", waitCursor=True):
            files = radiograph_files(paths)
            if not files:
                raise ValueError("No radiographs found there.")
        if not files:
            return
        wf = self.logic.workflow(self._parameterNode)
        volumes, problems = [], []

        def add(loaded):
            if isinstance(loaded, Exception):
                problems.append(str(loaded))
            else:
                volumes.append(wf.add_radiograph(loaded))

        def done(job):
            if volumes:
                self._parameterNode.inputVolume = volumes[0]
                slicer.util.setSliceViewerLayers(background=volumes[0], foreground=None, fit=True)
            self.ui.statusLabel.text = f"Loaded {len(volumes)} of {len(files)} radiographs."
            if problems:
                slicer.util.warningDisplay(f"{len(problems)} file(s) could not be read.",
                                           detailedText="\n".join(problems))
            if then is not None:
                then(volumes)

        self._run(button, Job(read_work(files)).start(), done, add)

    # -- segment, edit, score

    def _volume(self):
        volume = self._parameterNode.inputVolume
        if volume is None:
            raise ValueError("Choose an input radiograph first.")
        return volume

    def onSegment(self):
        if self._cancelRunningJob():
            return
        with slicer.util.tryWithErrorDisplay("Segmentation failed.", waitCursor=True):
            volume = self._volume()
            wf = self.logic.workflow(self._parameterNode)
            request = wf.prepare_segment(volume)
            overwrite = False
            if request.edited:
                if not slicer.util.confirmOkCancelDisplay(
                        "The vertebrae of this radiograph were edited. Segmenting again replaces the edits.\n\n"
                        "Replace them?", windowTitle="AAC Score"):
                    return
                overwrite = True

            def done(job):
                outcome = wf.apply_segment(request, job.result, overwrite)
                self._showSegmentation(volume, outcome.segmentation)
                self.ui.statusLabel.text = f"Segmentation {outcome.status}. {outcome.message}".strip()

            self._run(self.ui.segmentButton, wf.start_segment(request), done)

    def onEditSegments(self):
        with slicer.util.tryWithErrorDisplay("Cannot open the Segment Editor.", waitCursor=True):
            volume = self._volume()
            segmentation = self._parameterNode.segmentation
            if segmentation is None:
                raise ValueError("Segment the radiograph first (or choose a segmentation).")
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            editor.setSegmentationNode(segmentation)
            editor.setSourceVolumeNode(volume)

    def onScore(self):
        if self._cancelRunningJob():
            return
        with slicer.util.tryWithErrorDisplay("Scoring failed.", waitCursor=True):
            volume = self._volume()
            wf = self.logic.workflow(self._parameterNode)
            request = wf.prepare_score(volume, self._parameterNode.segmentation)

            def done(job):
                outcome = wf.apply_score(request, *job.result)
                self._showScore(volume, outcome)

            self._run(self.ui.scoreButton, wf.start_score(request), done)

    # -- batch and review

    def onScoreAll(self):
        if self._cancelRunningJob():
            return
        from AACScoreLib.slicer.workflow import radiograph_volumes

        with slicer.util.tryWithErrorDisplay("Batch scoring failed.", waitCursor=True):
            volumes = radiograph_volumes(slicer.mrmlScene)
            if not volumes:
                raise ValueError("No radiographs to score.")
            wf = self.logic.workflow(self._parameterNode)
            requests, problems = wf.prepare_batch(volumes)
            outcomes = [wf.record_problem(volume, message) for volume, message in problems]
            self._runBatch(self.ui.scoreAllButton, wf, wf.start_batch(requests), outcomes, len(volumes))

    def onScoreFolder(self):
        """Score the files without loading them: the table gets a row each; flagged ones load on review."""
        if self._cancelRunningJob():
            return
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Score every radiograph in a folder")
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay("Batch scoring failed.", waitCursor=True):
            wf = self.logic.workflow(self._parameterNode)
            requests = wf.prepare_files([folder])
            if not requests:
                raise ValueError(f"No radiographs found in {folder}.")
            self._runBatch(self.ui.scoreFolderButton, wf, wf.start_batch(requests, heatmap=False), [], len(requests))

    def _runBatch(self, button, wf, job, outcomes, total):
        from AACScoreLib.slicer.workflow import BatchOutcome

        def done(job):
            self.ui.statusLabel.text = BatchOutcome(outcomes, total, job.cancelled).message
            self._showResultsLayout()

        self._run(button, job, done, lambda item: outcomes.append(wf.apply_score(*item)), runsWhenCancelled=True)

    def onNextToReview(self):
        """Select the next radiograph whose result QC flagged (loading it when only its row is in the scene)."""
        from AACScoreLib.slicer.workflow import radiograph_key

        with slicer.util.tryWithErrorDisplay("Could not show the next result to review.", waitCursor=True):
            wf = self.logic.workflow(self._parameterNode)
            current = self._parameterNode.inputVolume
            row = wf.next_to_review(radiograph_key(current) if current is not None else None)
            if row is None:
                self.ui.statusLabel.text = "No result is flagged for review."
                return
            volume = wf.volume_for_file(row["file"])
            if volume is not None:
                self._parameterNode.inputVolume = volume
                self._showResultsLayout()
            elif os.path.isfile(row["file"]):
                self._load(self.ui.nextToReviewButton, [row["file"]], then=lambda volumes: self._showResultsLayout())
            else:
                raise ValueError(f"{row['file']}: flagged, but neither in the scene nor on disk.")

    def onExportCsv(self):
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Export the results table", "results.csv",
                                              "CSV (*.csv)")
        if path:
            with slicer.util.tryWithErrorDisplay("Could not write the CSV file.", waitCursor=True):
                self.logic.workflow().export_csv(path)
                self.ui.statusLabel.text = f"Results written to {path}"

    def onExportDicom(self):
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Write DICOM SEG, SR and heatmap to")
        if folder:
            with slicer.util.tryWithErrorDisplay("Could not export DICOM (needs highdicom: Slicer 5.12).",
                                                 waitCursor=True):
                from AACScoreLib.slicer.dicom import export_dicom

                written = export_dicom(self.logic.workflow(self._parameterNode), self._volume(), folder)
                self.ui.statusLabel.text = "Written: " + ", ".join(os.path.basename(str(p)) for p in written.values())

    def onLoadDicomSeg(self):
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "A DICOM SEG of L1-L5", "",
                                              "DICOM (*.dcm);;All files (*)")
        if not path:
            return
        from AACScoreLib.errors import AACScoreError

        with slicer.util.tryWithErrorDisplay("Could not load the DICOM SEG (needs highdicom: Slicer 5.12).",
                                             waitCursor=True):
            from AACScoreLib.slicer.dicom import load_dicom_seg

            workflow, volume = self.logic.workflow(self._parameterNode), self._volume()
            try:
                segmentation = load_dicom_seg(workflow, volume, path)
            except AACScoreError as error:  # a person's edits: ask before replacing them
                if "was edited" not in str(error) or not slicer.util.confirmYesNoDisplay(
                        f"{error}\n\nReplace the edited segments with the DICOM SEG?"):
                    raise
                segmentation = load_dicom_seg(workflow, volume, path, overwrite=True)
            self._parameterNode.segmentation = segmentation
            self.ui.statusLabel.text = f"Segments L1-L5 loaded from {os.path.basename(path)}."

    # -- raters

    def _raterSpinBoxes(self):
        return [getattr(self.ui, f"rater{column}SpinBox") for column in SUBSCORE_COLUMNS]

    def _updateRaterTotal(self, *_):
        self.ui.raterTotalLabel.text = str(sum(spinBox.value for spinBox in self._raterSpinBoxes()))

    def _showRating(self):
        """Put this rater's stored subscores for the current radiograph into the spin boxes (or zeros)."""
        volume = self._parameterNode.inputVolume
        rater = self._parameterNode.raterName.strip()
        row = None
        if volume is not None and rater and slicer.mrmlScene.GetFirstNodeByName("AACScore results") is not None:
            row = self.logic.workflow().rating(volume, rater)
        for column, spinBox in zip(SUBSCORE_COLUMNS, self._raterSpinBoxes()):
            spinBox.value = int(row[column]) if row and row[column] is not None else 0
        self._updateRaterTotal()

    def onSaveRating(self):
        with slicer.util.tryWithErrorDisplay("Could not save the rating.", waitCursor=True):
            subscores = {column: spinBox.value for column, spinBox in zip(SUBSCORE_COLUMNS, self._raterSpinBoxes())}
            self.logic.workflow().save_rating(self._volume(), self._parameterNode.raterName, subscores)
            self.ui.statusLabel.text = f"Rating by {self._parameterNode.raterName.strip()} saved."
            self._showResultsLayout()

    def onAgreement(self):
        with slicer.util.tryWithErrorDisplay("Could not compute agreement.", waitCursor=True):
            agreements = self.logic.workflow().agreement()
            self.ui.agreementTextEdit.setPlainText(
                "\n".join(agreement.text() for agreement in agreements)
                or "Score radiographs and save ratings of at least two of them to compare.")

    # -- training set and fine-tuning

    def onBrowseTrainingSet(self):
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Training set folder",
                                                     self._parameterNode.trainingSetFolder)
        if folder:
            self._parameterNode.trainingSetFolder = folder
            self._showTrainingSetCount()

    def _trainingSetFolder(self):
        folder = self._parameterNode.trainingSetFolder.strip()
        if not folder:
            raise ValueError("Choose a training set folder first.")
        return folder

    def _showTrainingSetCount(self):
        from AACScoreLib.io.training_set import TrainingSet

        folder = self._parameterNode.trainingSetFolder.strip()
        if folder:
            counts = TrainingSet(folder).counts()
            self.ui.trainingSetCountLabel.text = (f"{counts['cases']} cases, {counts['scored']} with a rater's "
                                                  "scores (de-identified copies: pixels and spacing only).")

    def onAddToTrainingSet(self):
        with slicer.util.tryWithErrorDisplay("Could not add the case to the training set.", waitCursor=True):
            case, counts = self.logic.workflow(self._parameterNode).add_to_training_set(
                self._volume(), self._trainingSetFolder(), self._parameterNode.raterName,
                self._parameterNode.segmentation)
            scored = "with" if case.scores else "without"
            self.ui.statusLabel.text = f"Stored {case.case} {scored} scores ({counts['cases']} cases in the set)."
            self._showTrainingSetCount()

    def onFinetune(self):
        if self._cancelRunningJob():
            return
        import time

        kind = self.ui.finetuneKindComboBox.currentText
        base = (self._parameterNode.scorerModel if kind == "scorer" else self._parameterNode.segmenterModel) or None

        def done(job):
            path = job.result["path"]
            self.ui.statusLabel.text = f"Fine-tuned {kind} written to {path}."
            if slicer.util.confirmYesNoDisplay(f"Fine-tuning finished: {path}\n\nInstall this {kind} and use it?"):
                self._installAndUse(kind, path)

        with slicer.util.tryWithErrorDisplay("Could not start fine-tuning.", waitCursor=True):
            folder = self._trainingSetFolder()
            out = os.path.join(folder, "models", f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")
            job = self.logic.workflow(self._parameterNode).start_finetune(
                kind, folder, out, base, calibrate_qc=self.ui.finetuneQcCheckBox.checked)
            self._run(self.ui.finetuneButton, job, done)

    def _installAndUse(self, kind, path):
        def done(job):
            package = job.result
            if kind == "scorer":
                self._parameterNode.scorerModel = package["path"]
            else:
                self._parameterNode.segmenterModel = package["path"]
            self._refreshModels()
            self.ui.statusLabel.text = f"Using {kind} {package['name']} {package['version']}."

        job = self.logic.workflow(self._parameterNode).start_install_model(path)
        self._run(self.ui.finetuneButton, job, done)

    # -- showing results

    def _showSegmentation(self, volume, segmentation):
        """Show a job's segmentation, only if its radiograph is still the chosen one (the person may have chosen
        another while the job ran; attaching it there would score one radiograph with another's vertebrae)."""
        if segmentation is None or self._parameterNode.inputVolume is not volume:
            return
        self._parameterNode.segmentation = segmentation
        display = segmentation.GetDisplayNode()
        if display is not None:
            display.SetVisibility(True)
            display.SetOpacity2DFill(0.3)
        slicer.util.setSliceViewerLayers(background=volume, foreground=None, fit=True)

    def _showScore(self, volume, outcome):
        result = outcome.result
        self._showSegmentation(volume, outcome.segmentation)
        if result.status == "error":
            self.ui.statusLabel.text = f"Not scored: {result.message}"
        else:
            extra = "  (heatmap all zero: nothing in the model's attention)" if result.heatmap_all_zero else ""
            self.ui.statusLabel.text = (f"Scored ({result.status}). {result.message}".strip() + extra)
        if outcome.heatmap is not None and self._parameterNode.inputVolume is volume:
            slicer.util.setSliceViewerLayers(background=volume, foreground=outcome.heatmap,
                                             foregroundOpacity=self._parameterNode.heatmapOpacity)
        self._showResultsLayout()
        self._showStoredResult()

    def _showStoredResult(self):
        """Total, category (in its colour), QC verdict with interval and reasons, and subscores of the model's row
        for the current radiograph."""
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        row = None
        if volume is not None and slicer.mrmlScene.GetFirstNodeByName("AACScore results") is not None:
            row = self.logic.workflow().rating(volume, "model")
        from AACScoreLib.kauppila import CATEGORY_COLORS
        from AACScoreLib.slicer.workflow import is_flagged, qc_text

        total = row["aac24"] if row else None
        self.ui.resultTotalLabel.text = "–" if total is None else f"{total:.1f}"
        category = row["category"] if row and total is not None else ""
        self.ui.resultCategoryLabel.text = category
        self.ui.resultCategoryLabel.setStyleSheet(
            f"color: {CATEGORY_COLORS[category]}; font-weight: bold" if category in CATEGORY_COLORS else "")
        verdict, reasons = qc_text(row)
        self.ui.resultQcLabel.text = verdict
        self.ui.resultQcLabel.setStyleSheet("color: #c0392b; font-weight: bold" if row and is_flagged(row) else "")
        self.ui.resultQcReasonsLabel.text = reasons
        for index, column in enumerate(SUBSCORE_COLUMNS):
            value = row[column] if row else None
            item = qt.QTableWidgetItem("" if value is None else f"{value:.1f}")
            item.setTextAlignment(qt.Qt.AlignCenter)
            self.ui.subscoreTable.setItem(index % 2, index // 2, item)

    def _showResultsLayout(self):
        """The Red slice view alone above the results table (sortable, e.g. by QC verdict)."""
        from AACScoreLib.slicer import scene as aac_scene

        layoutManager = slicer.app.layoutManager()
        table = self.logic.workflow().results_table()
        if layoutManager is not None:
            layoutNode = layoutManager.layoutLogic().GetLayoutNode()
            if not layoutNode.IsLayoutDescription(aac_scene.RESULTS_LAYOUT_ID):
                layoutNode.AddLayoutDescription(aac_scene.RESULTS_LAYOUT_ID, aac_scene.RESULTS_LAYOUT_XML)
            layoutManager.setLayout(aac_scene.RESULTS_LAYOUT_ID)
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()
        if layoutManager is not None and layoutManager.tableWidget(0) is not None:
            layoutManager.tableWidget(0).tableView().setSortingEnabled(True)

    # -- settings

    def _probeDevice(self):
        """Ask the worker which device the chosen setting gives (it imports torch; Slicer never does)."""
        device = self._parameterNode.device if self._parameterNode else None
        if device is None or device == self._probedDevice or self._probe is not None:
            return
        self._probedDevice = device
        self.ui.deviceStatusLabel.text = "Asking the worker process…"
        try:
            self._probe = self.logic.workflow(self._parameterNode).start_probe()
        except Exception as error:  # noqa: BLE001 - e.g. PythonSlicer missing: say it, do not break the panel
            self.ui.deviceStatusLabel.text = f"The worker process cannot start: {error}"
            return
        self._timer.start()

    def _pollProbe(self):
        probe = self._probe
        if probe is None:
            return
        probe.poll()
        if not probe.done:
            return
        self._probe = None
        if probe.error is not None:
            self.ui.deviceStatusLabel.text = f"The worker process failed: {probe.error}"
            self._probedDevice = None  # ask again on the next change
        elif not probe.cancelled:
            self.ui.deviceStatusLabel.text = probe.result["message"]
        if self._parameterNode is not None and self._parameterNode.device != self._probedDevice:
            self._probeDevice()  # the choice changed meanwhile

    def checkDependencies(self):
        """True when every pinned package is installed; otherwise says what is missing (no import of them)."""
        from AACScoreLib.slicer import dependencies

        missing = dependencies.missing_requirements()
        absent = [line for line in missing if "not installed" in line]
        self.ui.dependencyStatusLabel.text = (
            "All pinned packages installed." if not missing else
            "Missing or different: " + ", ".join(missing))
        self._dependenciesReady = not absent
        self.ui.installDependenciesButton.enabled = bool(absent) and self._job is None
        for button in self._actionButtons():
            if button is not self._jobButton and button is not self.ui.dicomButton:
                button.enabled = not absent and self._job is None
                button.toolTip = "" if not absent else "Install the missing Python packages first (Settings)."
        if absent:
            self.ui.settingsCollapsibleButton.collapsed = False
        self._updateFromParameterNode()
        return not absent

    def _pyTorchUtils(self):
        """The PyTorch extension's logic (how the anchors install torch), or None when it is not installed."""
        try:
            import PyTorchUtils
        except ImportError:
            return None
        return PyTorchUtils.PyTorchUtilsLogic()

    def onInstallDependencies(self):
        """torch first through PyTorchUtils (the build for this computer's GPU), then the rest with pip in a
        subprocess, Slicer's own packages held at their versions; every other action waits meanwhile."""
        from AACScoreLib.slicer import dependencies
        from AACScoreLib.slicer.workflow import Job

        torchUtils = self._pyTorchUtils()
        torchAbsent = any(line.startswith("torch==") and "not installed" in line
                          for line in dependencies.missing_requirements())
        constraints = os.path.join(slicer.app.temporaryPath, "AACScore-constraints.txt")
        calls = dependencies.pip_install_arguments(constraints, without_torch=torchUtils is not None)
        steps = [f"PyTorch {dependencies.TORCH_RANGES['torch']} through the PyTorch extension"] \
            if torchAbsent and torchUtils is not None else []
        steps += ["pip install " + " ".join(call) for call in calls]
        if not steps:
            self.checkDependencies()
            return
        if not slicer.util.confirmOkCancelDisplay(
                "Install AACScore's Python packages into Slicer's Python? This downloads up to a few GB and "
                "never replaces Slicer's own packages.", detailedText="\n".join(steps), windowTitle="AAC Score"):
            return
        self._setBusy(True)
        try:
            if torchAbsent and torchUtils is not None:
                self.ui.statusLabel.text = "Installing PyTorch through the PyTorch extension…"
                with slicer.util.tryWithErrorDisplay("Installing PyTorch failed.", waitCursor=True):
                    if torchUtils.installTorch(askConfirmation=False,
                                               torchVersionRequirement=dependencies.TORCH_RANGES["torch"],
                                               torchvisionVersionRequirement=dependencies.TORCH_RANGES["torchvision"]
                                               ) is None:
                        raise RuntimeError("PyTorch was not installed.")
                # the rest is resolved against the torch now installed, which pip must keep
                calls = dependencies.pip_install_arguments(constraints, without_torch=True)
        finally:
            self._setBusy(False)

        def done(job):
            self.ui.statusLabel.text = "Packages installed."
            if self.checkDependencies():
                self._refreshModels()
                self.logic.stopWorker()  # the next job starts a worker that sees the new packages

        if calls:
            self._run(self.ui.installDependenciesButton, Job(dependencies.pip_work(calls)).start(), done)
        else:
            self.checkDependencies()

    def _refreshModels(self):
        from AACScoreLib import packages

        with slicer.util.tryWithErrorDisplay("Could not list the model packages.", waitCursor=False):
            installed = packages.list_packages()
            for combo, kind, chosen in ((self.ui.scorerModelComboBox, "scorer", self._parameterNode.scorerModel),
                                        (self.ui.segmenterModelComboBox, "segmenter",
                                         self._parameterNode.segmenterModel)):
                wasBlocked = combo.blockSignals(True)
                combo.clear()
                combo.addItem("newest installed", "")
                for package in installed:
                    if package.kind == kind:
                        suffix = " (demo)" if package.bundled else ""
                        combo.addItem(f"{package.name} {package.version}{suffix}", str(package.path))
                index = combo.findData(chosen)
                combo.setCurrentIndex(max(index, 0))
                combo.blockSignals(wasBlocked)

    def _onModelChosen(self, *_):
        if self._parameterNode is None:
            return
        self._parameterNode.scorerModel = self.ui.scorerModelComboBox.currentData or ""
        self._parameterNode.segmenterModel = self.ui.segmenterModelComboBox.currentData or ""

    def onInstallModel(self):
        if self._cancelRunningJob():
            return
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "Install a model package (.zip)", "",
                                              "Model package (*.zip);;All files (*)")
        if not path:
            path = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "…or a model package folder")
        if not path:
            return

        def done(job):
            if job.cancelled:  # the worker was stopped: the package is installed only if it got that far
                self.ui.statusLabel.text = "Cancelled before the install finished; the model list shows what is there."
            else:
                package = job.result
                self.ui.statusLabel.text = f"Installed {package['kind']} {package['name']} {package['version']}."
            self._refreshModels()

        with slicer.util.tryWithErrorDisplay("Could not install the model.", waitCursor=True):
            job = self.logic.workflow(self._parameterNode).start_install_model(path)
            self._run(self.ui.installModelButton, job, done, runsWhenCancelled=True)

    def onVerifyModels(self):
        from AACScoreLib import packages
        from AACScoreLib.errors import ModelPackageError

        with slicer.util.tryWithErrorDisplay("Could not verify the model packages.", waitCursor=True):
            lines = []
            for package in packages.list_packages():
                try:
                    packages.verify_package(package.path)
                    lines.append(f"OK      {package.kind} {package.name} {package.version}")
                except ModelPackageError as error:
                    lines.append(f"FAILED  {package.kind} {package.name} {package.version}: {error}")
            slicer.util.infoDisplay("\n".join(lines) or "No model packages installed.",
                                    windowTitle="AAC Score models")


class AACScoreLogic(ScriptedLoadableModuleLogic):
    """Entry point for scripts inside Slicer; every behaviour is AACScoreLib.slicer.workflow.Workflow's.

    Holds the worker process (one per Slicer session, kept across scenes so the models stay loaded)."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._workflow = None
        self._worker = None
        self._workerPython = ""

    def getParameterNode(self):
        return AACScoreParameterNode(super().getParameterNode())

    def worker(self):
        from AACScoreLib.worker.client import WorkerClient

        if self._worker is None:
            self._worker = WorkerClient(self._workerPython or None, temporary_dir=slicer.app.temporaryPath)
        return self._worker

    def setWorkerPython(self, python):
        """Use another Python for the worker (an environment holding the packages); "" for PythonSlicer."""
        if (python or "") != self._workerPython:
            self._workerPython = python or ""
            self.stopWorker()

    def stopWorker(self):
        if self._worker is not None:
            self._worker.stop()
            self._worker = None
            self._workflow = None

    def takeWorkerLog(self):
        return self._worker.take_log() if self._worker is not None else []

    def workflow(self, parameters=None):
        """The scene's Workflow, running its jobs in the worker, configured from the parameters if given."""
        from AACScoreLib.slicer.workflow import Workflow

        if self._workflow is None or self._workflow.scene is not slicer.mrmlScene:
            self._workflow = Workflow(slicer.mrmlScene, worker=self.worker())
        if parameters is not None:
            self._workflow.configure(parameters.scorerModel or None, parameters.segmenterModel or None,
                                     parameters.device)
        return self._workflow

    def process(self, volume, segmentation=None, heatmap=True):
        """Score a radiograph volume from a script (segmenting it first when it has no segmentation)."""
        return self.workflow().score(volume, segmentation, heatmap=heatmap)


class AACScoreTest(ScriptedLoadableModuleTest):
    """Inside Slicer: the scene side on a demo radiograph always; the whole flow (worker, models) only where
    AACScore's packages are installed, as TotalSegmentator gates its logic test: the extension build machines
    that run this test have no PyTorch."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        from AACScoreLib.slicer import dependencies

        self.setUp()
        self.test_sample_data_and_results_view()
        unsupported = dependencies.unsupported_python()
        absent = [line for line in dependencies.missing_requirements() if "not installed" in line]
        if unsupported or absent:
            self.delayDisplay("Skipping the scoring test: " + (unsupported or "not installed: " + ", ".join(absent)))
            return
        self.setUp()
        self.test_whole_flow_on_sample_data()

    def test_sample_data_and_results_view(self):
        import SampleData

        from AACScoreLib.slicer import sample_data
        from AACScoreLib.slicer import scene as aac_scene
        from AACScoreLib.slicer.workflow import Workflow

        self.delayDisplay("Loading a demo radiograph")
        registerResources()
        names = sample_data.register(SampleData.SampleDataLogic)
        volume = SampleData.downloadSample(names[0])
        self.assertIsNotNone(volume)
        workflow = Workflow(slicer.mrmlScene, worker=None)
        workflow.save_rating(volume, "Tester", dict.fromkeys(SUBSCORE_COLUMNS, 1))
        self.assertEqual(workflow.rating(volume, "Tester")["aac24"], 8.0)
        self.assertEqual(aac_scene.heatmap_color_node(slicer.mrmlScene).GetID(), aac_scene.SLICER_INFERNO_ID)
        layoutNode = slicer.app.layoutManager().layoutLogic().GetLayoutNode()
        if not layoutNode.IsLayoutDescription(aac_scene.RESULTS_LAYOUT_ID):
            layoutNode.AddLayoutDescription(aac_scene.RESULTS_LAYOUT_ID, aac_scene.RESULTS_LAYOUT_XML)
        slicer.app.layoutManager().setLayout(aac_scene.RESULTS_LAYOUT_ID)
        self.assertEqual(list(slicer.app.layoutManager().sliceViewNames()), ["Red"])
        self.assertIsNotNone(slicer.app.layoutManager().tableWidget(0))

    def test_whole_flow_on_sample_data(self):
        import SampleData

        from AACScoreLib.slicer import sample_data
        from AACScoreLib.slicer import scene as aac_scene
        from AACScoreLib.slicer.workflow import Workflow

        self.delayDisplay("Loading a demo radiograph")
        names = sample_data.register(SampleData.SampleDataLogic)
        self.assertTrue(names, "no demo radiographs in Resources/SampleData")
        volume = SampleData.downloadSample(names[0])
        self.assertIsNotNone(volume)

        self.delayDisplay("Segmenting L1-L5 in the worker process")
        workflow = Workflow(slicer.mrmlScene)
        outcome = workflow.segment(volume)
        self.assertEqual(outcome.status, "created", outcome.message)
        segmentation = outcome.segmentation
        names_found = [segmentation.GetSegmentation().GetNthSegment(i).GetName() for i in range(5)]
        self.assertEqual(names_found, ["L1", "L2", "L3", "L4", "L5"])

        self.delayDisplay("Scoring")
        scored = workflow.score(volume)
        self.assertNotEqual(scored.result.status, "error", scored.result.message)
        self.assertTrue(0.0 <= scored.result.aac24 <= 24.0)
        self.assertIsNotNone(scored.heatmap)
        heat = slicer.util.arrayFromVolume(scored.heatmap)
        self.assertEqual(heat.shape, slicer.util.arrayFromVolume(volume).shape)
        self.assertEqual(len(scored.boundary_lines), 5)
        workflow.score(volume)  # again: the row is updated, not duplicated
        rows = aac_scene.result_rows(workflow.results_table(), "model")
        self.assertEqual(len(rows), 1)
        self.assertAlmostEqual(rows[0]["aac24"], round(scored.result.aac24, 3), places=2)

        self.delayDisplay("Saving and reloading the scene (.mrb)")
        path = os.path.join(slicer.app.temporaryPath, "AACScoreTest.mrb")
        self.assertTrue(slicer.util.saveScene(path))
        slicer.mrmlScene.Clear()
        slicer.util.loadScene(path)
        radiographs = [node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                       if node.GetAttribute(aac_scene.ROLE_ATTRIBUTE) == "radiograph"
                       or node.GetName() == volume.GetName()]
        self.assertEqual(len(radiographs), 1)
        reloaded = radiographs[0]
        self.assertIsNotNone(aac_scene.find_vertebra_segmentation(slicer.mrmlScene, reloaded))
        reloaded_rows = aac_scene.result_rows(aac_scene.results_table(slicer.mrmlScene), "model")
        self.assertEqual(len(reloaded_rows), 1)
        self.assertAlmostEqual(reloaded_rows[0]["aac24"], rows[0]["aac24"], places=3)
        heatmaps = [node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                    if node.GetAttribute(aac_scene.ROLE_ATTRIBUTE) == "heatmap"]
        self.assertEqual(len(heatmaps), 1)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLMarkupsLineNode"), 5)
        os.remove(path)
        workflow.worker.stop()
        self.delayDisplay("Test passed")
