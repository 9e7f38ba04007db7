"""Everything that touches an MRML scene or Slicer's own Python: scene nodes, the panel's workflow,
dependency installs inside Slicer and the registered sample data.

Takes a scene (slicer-core's headless one in tests, Slicer's inside the application); gives volumes,
segmentations, heatmaps and result tables in it, from results the worker process (`AACScoreLib.worker`)
computes. Nothing else in the library imports `slicer`, and nothing here imports torch.
"""
