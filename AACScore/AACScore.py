"""3D Slicer module AACScore: a thin widget over AACScoreLib, which holds every behaviour.

Nothing here computes anything; it binds the panel to AACScoreLib functions that take the MRML scene as an
argument, so the same code runs headless (slicer-core, the `aacscore` command, the tests) and inside Slicer.
"""

import os

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


class AACScore(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "AAC Score"
        self.parent.categories = ["Quantification"]
        self.parent.dependencies = []
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


class AACScoreWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AACScore.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = AACScoreLogic()


class AACScoreLogic(ScriptedLoadableModuleLogic):
    """Entry point for scripts inside Slicer; delegates to AACScoreLib."""


class AACScoreTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_core_importable()

    def test_core_importable(self):
        import AACScoreLib.kauppila as kauppila

        self.assertEqual(kauppila.category(4), "no/mild")
        self.assertTrue(os.path.isdir(os.path.dirname(kauppila.__file__)))
