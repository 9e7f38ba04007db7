"""Stage 1, segmentation: a `Radiograph` to an L1..L5 label map, with nnU-Net v2 (2D).

Takes a radiograph and a segmenter model package; gives a label map at the image's own size, the T12/S1 context
for models trained with those classes, and how the levels were counted (levels.py). Also holds what makes a
segmenter: nnU-Net dataset export (with context classes and randomised copies), training, and converting nnU-Net
results into a model package without unpickling at load time.
"""
