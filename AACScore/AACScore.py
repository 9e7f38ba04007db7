"""3D Slicer module AACScore: a thin panel over AACScoreLib, which holds every behaviour.

The widget binds the panel to `AACScoreLib.slicer.workflow.Workflow` (tested headless against slicer-core's scene):
it prepares work from the scene, runs the compute part on a Python thread that a qt.QTimer polls (the pressed
button turns into Cancel), and applies results to the scene on the main thread.
"""

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
        slicer.app.connect("startupCompleted()", _onStartupCompleted)


def _onStartupCompleted():
    """Terminology of L1-L5 for the Segment Editor, and the demo radiographs in Sample Data."""
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
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    scorerModel: str = ""  # package path; "" = newest installed, else the bundled demo
    segmenterModel: str = ""
    raterName: str = ""


class AACScoreWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobButton = None
        self._jobButtonText = ""
        self._onItem = None
        self._onDone = None
        self._dependenciesReady = False
        self._shownVolumeId = None
        self._deviceMessages = {}
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._pollJob)

    # -- set-up

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AACScore.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = AACScoreLogic()

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
        self.ui.exportCsvButton.connect("clicked(bool)", self.onExportCsv)
        self.ui.saveRatingButton.connect("clicked(bool)", self.onSaveRating)
        self.ui.agreementButton.connect("clicked(bool)", self.onAgreement)
        self.ui.installModelButton.connect("clicked(bool)", self.onInstallModel)
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

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self._disconnectParameterNode()

    def onSceneStartClose(self, caller, event):
        if self._job is not None:
            self._job.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node (as Slicer's module template)

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if (volume and not volume.IsA("vtkMRMLLabelMapVolumeNode")
                    and volume.GetAttribute("AACScore.Role") != "heatmap"):
                self._parameterNode.inputVolume = volume

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
        for button in (self.ui.segmentButton, self.ui.scoreButton, self.ui.saveRatingButton):
            if button is not self._jobButton:
                button.enabled = idle and volume is not None
        self.ui.editButton.enabled = idle and volume is not None
        if not self._dependenciesReady:
            return
        volumeId = volume.GetID() if volume is not None else None
        if volumeId != self._shownVolumeId:  # another radiograph: its own segmentation and ratings
            self._shownVolumeId = volumeId
            self._onVolumeChanged(volume)
        self._showHeatmapOpacity()
        self._showStoredResult()
        self.ui.deviceStatusLabel.text = self._deviceMessage()

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

    # -- background jobs: the pressed button becomes Cancel

    def _run(self, button, work, onDone=None, onItem=None):
        """Run `work(job)` on a thread; here, `onItem(item)` applies each delivered item and `onDone(job)` the
        end (not after a cancel unless `onDone.runsWhenCancelled`)."""
        from AACScoreLib.slicer.workflow import Job

        self._job = Job(work).start()
        self._jobButton, self._jobButtonText = button, button.text
        self._onItem, self._onDone = onItem, onDone
        button.text = "Cancel"
        button.enabled = True
        self._setActionsEnabled(False)
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

    def _pollJob(self):
        job = self._job
        if job is None:
            self._timer.stop()
            return
        fraction, text, items, done = job.poll()
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = text
        for item in items:
            with slicer.util.tryWithErrorDisplay("Could not put a result into the scene.", waitCursor=False):
                self._onItem(item)
        if not done:
            return
        self._timer.stop()
        self._job = None
        self._jobButton.text = self._jobButtonText
        self._jobButton = None
        self.ui.progressBar.visible = False
        self._setActionsEnabled(True)
        self._updateFromParameterNode()
        if job.error is not None:
            self.ui.statusLabel.text = "Failed."
            details = "".join(traceback.format_exception(type(job.error), job.error, job.error.__traceback__))
            slicer.util.errorDisplay(str(job.error), detailedText=details)
            return
        if job.cancelled:
            self.ui.statusLabel.text = "Cancelled."
            if not getattr(self._onDone, "runsWhenCancelled", False):
                return
        if self._onDone is not None:
            with slicer.util.tryWithErrorDisplay("Could not put the result into the scene.", waitCursor=True):
                self._onDone(job)

    def _setActionsEnabled(self, enabled):
        for button in (self.ui.loadFilesButton, self.ui.loadFolderButton, self.ui.segmentButton,
                       self.ui.editButton, self.ui.scoreButton, self.ui.scoreAllButton, self.ui.scoreFolderButton,
                       self.ui.installModelButton):
            if button is not self._jobButton:
                button.enabled = enabled

    # -- loading

    def onLoadFiles(self):
        paths = qt.QFileDialog.getOpenFileNames(
            slicer.util.mainWindow(), "Load radiographs", "",
            "Radiographs (*.dcm *.dicom *.ima *.png *.jpg *.jpeg *.nrrd *.nii *.nii.gz);;All files (*)")
        if paths:
            self._load(self.ui.loadFilesButton, list(paths))

    def onLoadFolder(self):
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Load every radiograph in a folder")
        if folder:
            self._load(self.ui.loadFolderButton, [folder])

    def _load(self, button, paths, then=None):
        """Read the files on a thread, add each as a volume here; then `then(volumes)`."""
        if self._cancelRunningJob():
            return
        from AACScoreLib.slicer.workflow import radiograph_files, read_work

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

        self._run(button, read_work(files), done, add)

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

            self._run(self.ui.segmentButton,
                      lambda job: wf.compute_segment(request, job.report, job.is_cancelled), done)

    def onEditSegments(self):
        with slicer.util.tryWithErrorDisplay("Cannot open the Segment Editor.", waitCursor=True):
            volume = self._volume()
            segmentation = self._parameterNode.segmentation
            if segmentation is None:
                raise ValueError("Segment the radiograph first (or choose a segmentation).")
            slicer.util.selectModule("SegmentEditor")
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
            editor.setSegmentationNode(segmentation)
            if hasattr(editor, "setSourceVolumeNode"):
                editor.setSourceVolumeNode(volume)
            else:  # Slicer before 5.4
                editor.setMasterVolumeNode(volume)

    def onScore(self):
        if self._cancelRunningJob():
            return
        with slicer.util.tryWithErrorDisplay("Scoring failed.", waitCursor=True):
            volume = self._volume()
            wf = self.logic.workflow(self._parameterNode)
            request = wf.prepare_score(volume, self._parameterNode.segmentation)

            def done(job):
                outcome = wf.apply_score(request, job.result)
                self._showScore(volume, outcome)

            self._run(self.ui.scoreButton,
                      lambda job: wf.compute_score(request, job.report, job.is_cancelled), done)

    # -- batch

    def onScoreAll(self):
        if self._cancelRunningJob():
            return
        from AACScoreLib.slicer.workflow import radiograph_volumes

        self._scoreBatch(self.ui.scoreAllButton, radiograph_volumes(slicer.mrmlScene))

    def onScoreFolder(self):
        if self._cancelRunningJob():
            return
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), "Score every radiograph in a folder")
        if folder:
            self._load(self.ui.scoreFolderButton, [folder],
                       then=lambda volumes: self._scoreBatch(self.ui.scoreFolderButton, volumes))

    def _scoreBatch(self, button, volumes):
        from AACScoreLib.slicer.workflow import BatchOutcome

        with slicer.util.tryWithErrorDisplay("Batch scoring failed.", waitCursor=True):
            if not volumes:
                raise ValueError("No radiographs to score.")
            wf = self.logic.workflow(self._parameterNode)
            requests, problems = wf.prepare_batch(volumes)
            outcomes = [wf.record_problem(volume, message) for volume, message in problems]
            total = len(volumes)

            def apply(item):
                outcomes.append(wf.apply_score(*item))

            def done(job):
                batch = BatchOutcome(outcomes, total, job.cancelled)
                self.ui.statusLabel.text = batch.message
                self._showTable()

            done.runsWhenCancelled = True
            self._run(button, wf.batch_work(requests), done, apply)

    def onExportCsv(self):
        path = qt.QFileDialog.getSaveFileName(slicer.util.mainWindow(), "Export the results table", "results.csv",
                                              "CSV (*.csv)")
        if path:
            with slicer.util.tryWithErrorDisplay("Could not write the CSV file.", waitCursor=True):
                self.logic.workflow().export_csv(path)
                self.ui.statusLabel.text = f"Results written to {path}"

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
            self._showTable()

    def onAgreement(self):
        with slicer.util.tryWithErrorDisplay("Could not compute agreement.", waitCursor=True):
            agreements = self.logic.workflow().agreement()
            self.ui.agreementTextEdit.setPlainText(
                "\n".join(agreement.text() for agreement in agreements)
                or "Score radiographs and save ratings of at least two of them to compare.")

    # -- showing results

    def _showSegmentation(self, volume, segmentation):
        if segmentation is None:
            return
        self._parameterNode.segmentation = segmentation
        display = segmentation.GetDisplayNode()
        if display is not None:
            display.SetVisibility(True)
            display.SetOpacity2DFill(0.3)
        slicer.util.setSliceViewerLayers(background=volume, foreground=None, fit=True)

    def _showScore(self, volume, outcome):
        result = outcome.result
        if outcome.segmentation is not None:
            self._showSegmentation(volume, outcome.segmentation)
        if result.status == "error":
            self.ui.statusLabel.text = f"Not scored: {result.message}"
        else:
            extra = "  (heatmap all zero: nothing in the model's attention)" if result.heatmap_all_zero else ""
            self.ui.statusLabel.text = (f"Scored ({result.status}). {result.message}".strip() + extra)
        if outcome.heatmap is not None:
            slicer.util.setSliceViewerLayers(background=volume, foreground=outcome.heatmap,
                                             foregroundOpacity=self._parameterNode.heatmapOpacity)
        self._showStoredResult()

    def _showStoredResult(self):
        """Total, category (in its colour) and subscores of the model's row for the current radiograph."""
        volume = self._parameterNode.inputVolume if self._parameterNode else None
        row = None
        if volume is not None and slicer.mrmlScene.GetFirstNodeByName("AACScore results") is not None:
            row = self.logic.workflow().rating(volume, "model")
        from AACScoreLib.kauppila import CATEGORY_COLORS

        total = row["aac24"] if row else None
        self.ui.resultTotalLabel.text = "–" if total is None else f"{total:.1f}"
        category = row["category"] if row and total is not None else ""
        self.ui.resultCategoryLabel.text = category
        self.ui.resultCategoryLabel.setStyleSheet(
            f"color: {CATEGORY_COLORS[category]}; font-weight: bold" if category in CATEGORY_COLORS else "")
        for index, column in enumerate(SUBSCORE_COLUMNS):
            value = row[column] if row else None
            item = qt.QTableWidgetItem("" if value is None else f"{value:.1f}")
            item.setTextAlignment(qt.Qt.AlignCenter)
            self.ui.subscoreTable.setItem(index % 2, index // 2, item)

    def _showHeatmapOpacity(self):
        if self._parameterNode is None:
            return
        layout = slicer.app.layoutManager()
        if layout is None:
            return
        for name in layout.sliceViewNames():
            composite = layout.sliceWidget(name).mrmlSliceCompositeNode()
            if composite.GetForegroundVolumeID():
                composite.SetForegroundOpacity(self._parameterNode.heatmapOpacity)

    def _showTable(self):
        table = self.logic.workflow().results_table()
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()

    # -- settings

    def _deviceMessage(self):
        """What the chosen device means here (probed once per choice: the probe imports torch)."""
        device = self._parameterNode.device if self._parameterNode else None
        if device is not None and device not in self._deviceMessages:
            from AACScoreLib.devices import device_choice

            self._deviceMessages[device] = device_choice(device)[1]
        return self._deviceMessages.get(device, "")

    def checkDependencies(self):
        """True when every pinned package is installed; otherwise says what is missing."""
        from AACScoreLib.slicer import dependencies

        missing = dependencies.missing_requirements()
        absent = [line for line in missing if "not installed" in line]
        self.ui.dependencyStatusLabel.text = (
            "All pinned packages installed." if not missing else
            "Missing or different: " + ", ".join(missing))
        self._dependenciesReady = not absent
        self.ui.installDependenciesButton.enabled = bool(absent)
        for button in (self.ui.segmentButton, self.ui.scoreButton, self.ui.scoreAllButton,
                       self.ui.scoreFolderButton, self.ui.loadFilesButton, self.ui.loadFolderButton):
            button.enabled = not absent
        if absent:
            self.ui.settingsCollapsibleButton.collapsed = False
        return not absent

    def onInstallDependencies(self):
        from AACScoreLib.slicer import dependencies

        constraints = os.path.join(slicer.app.temporaryPath, "AACScore-constraints.txt")
        calls = dependencies.pip_install_arguments(constraints)
        if not calls:
            self.checkDependencies()
            return
        text = "\n".join("pip install " + " ".join(call) for call in calls)
        if not slicer.util.confirmOkCancelDisplay(
                "Install AACScore's Python packages into Slicer's Python? This downloads up to a few GB and "
                "never replaces Slicer's own packages.", detailedText=text, windowTitle="AAC Score"):
            return
        with slicer.util.tryWithErrorDisplay("Installing the packages failed.", waitCursor=True):
            dependencies.install_missing(constraints, slicer.util.pip_install, logging.info)
        if self.checkDependencies():
            self._refreshModels()

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
        from AACScoreLib import models

        def done(job):
            package = job.result
            self.ui.statusLabel.text = f"Installed {package.kind} {package.name} {package.version}."
            self._refreshModels()

        self._run(self.ui.installModelButton, lambda job: models.install_model(path), done)

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
    """Entry point for scripts inside Slicer; every behaviour is AACScoreLib.slicer.workflow.Workflow's."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self._workflow = None

    def getParameterNode(self):
        return AACScoreParameterNode(super().getParameterNode())

    def workflow(self, parameters=None):
        """The scene's Workflow (models stay loaded between calls), configured from the parameters if given."""
        from AACScoreLib.slicer.workflow import Workflow

        if self._workflow is None or self._workflow.scene is not slicer.mrmlScene:
            self._workflow = Workflow(slicer.mrmlScene)
        if parameters is not None:
            self._workflow.configure(parameters.scorerModel or None, parameters.segmenterModel or None,
                                     parameters.device)
        return self._workflow

    def process(self, volume, segmentation=None, heatmap=True):
        """Score a radiograph volume from a script (segmenting it first when it has no segmentation)."""
        return self.workflow().score(volume, segmentation, heatmap=heatmap)


class AACScoreTest(ScriptedLoadableModuleTest):
    """The whole flow inside Slicer on a demo radiograph: load, segment, score, table, heatmap, .mrb."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_whole_flow_on_sample_data()

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

        self.delayDisplay("Segmenting L1-L5")
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
        self.delayDisplay("Test passed")
