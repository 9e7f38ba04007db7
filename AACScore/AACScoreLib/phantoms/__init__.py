"""Synthetic lateral lumbar radiographs with exact Kauppila truth, for training and testing.

Takes a seed and a style; gives a `Radiograph` (or a DICOM file), its L1..L5 label map and the true subscores,
measured from what was drawn. `anatomy` places the structures in millimetres; `generator` forms the image.
"""
