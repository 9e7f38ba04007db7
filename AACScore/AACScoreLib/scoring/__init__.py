"""Stage 3, scoring: the paper's crop to an AAC-24 total (and eight subscores), with a Grad-CAM heatmap.

Takes a crop from geometry and a scorer model package (scSE-ResNet regression); gives the score, its category and
a heatmap mapped back onto the radiograph. Also holds what makes a scorer: crops for training, augmentation,
the network and the training recipe.
"""
