"""Stage 1, segmentation: a `Radiograph` to an L1..L5 label map, with nnU-Net v2 (2D).

Takes a radiograph and a segmenter model package; gives a label map at the image's own size and how the levels
were assigned. Also holds what makes a segmenter: nnU-Net dataset export, training, and converting nnU-Net results
into a model package without unpickling at load time.
"""
