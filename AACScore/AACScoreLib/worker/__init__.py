"""The compute worker: a separate Python process that runs the pipeline for a client such as the Slicer panel.

Takes jobs (probe, segment, score, batch, install model) as JSON lines on its stdin, with the inputs as files in
a job folder; gives progress and results as JSON lines on its stdout and the arrays as NRRD files in that folder.
`server` is the process (it loads the models once and keeps them), `client` starts and talks to it without Qt,
and `protocol` holds what both sides share. Nothing here imports Slicer.
"""
