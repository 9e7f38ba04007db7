"""Stage 2, geometry: an L1..L5 label map to Kauppila landmarks and the paper's crop.

Takes a label map and pixel spacing; gives vertebra corners and centroids, disc mid-planes, the four aortic
segments (L1-L4), the anterior direction, and the upright crop the scorer sees; and from the label map, whether
the image is bone bright. Pure numpy and scipy; no models.
"""
