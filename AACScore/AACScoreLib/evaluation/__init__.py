"""Measuring results: the paper's agreement statistics, the evaluate report, and the benchmark.

Takes truth and prediction tables (and label maps); gives MAE, ICC, kappa, confusion matrices with bootstrap CIs
and Dice per vertebra; `bench` times every stage of the pipeline end to end.
"""
