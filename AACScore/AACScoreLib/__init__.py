"""AACScore core: Kauppila AAC-24 scoring of lateral lumbar radiographs, usable with or without 3D Slicer.

Nothing in this package imports the Slicer application, Qt or CTK; functions that touch MRML take the scene
as an argument so that they run against slicer-core's headless scene as well as inside Slicer.
"""

__version__ = "0.1.0"
