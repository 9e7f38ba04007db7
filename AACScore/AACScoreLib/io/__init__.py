"""Stage 0, in and out: files to a `Radiograph` and label maps, and results back to files.

Takes radiograph files (DICOM, PNG, JPEG, TIFF, NRRD, NIfTI), label maps and cohort lists; gives `Radiograph` objects
(float pixels, mm spacing, orientation hints), L1..L5 label arrays, sorted and sharded work lists, and writes
results.csv, label PNGs and overlays atomically. Imports no other stage.
"""
