"""Synthetic lateral lumbar radiographs with exact Kauppila truth, for training and testing.

Takes a seed, an index and a family (families.py); gives a `Phantom` (pixels, label map with L1..L5 and the context
classes T12, S1, the true subscores measured from what was drawn, the mask of the plaque that counts) or its DICOM
file. `anatomy` places and draws structures in millimetres, `truth` measures the Kauppila truth, `drawn` and
`varied` are families, `generator` is the public entry and command line, `randomise` varies looks at training time.
"""
