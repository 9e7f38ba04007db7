"""Stage 4, quality control: a verdict (ok / review / error) with reasons, and a prediction interval, per result.

Takes what the earlier stages produced for one radiograph (pixels, label map and where it came from, the
segmenter's level assignment when it gives one, Kauppila geometry, the scorer's crop and score) and the scorer
package's calibration file (`qc.json`); gives `QCVerdict`: the verdict, short machine-readable reason codes with
human text, the 80% interval of the AAC-24 total, and the raw measurements behind them. Every check is cheap
(a fraction of a second on two CPU cores) and measurable; `aacscore calibrate-qc` recomputes the calibration.
"""
