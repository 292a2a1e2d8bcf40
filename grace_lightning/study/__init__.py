"""The small-scale study (``python study.py``): the paper's Tables 1-2 rows on one backbone.

``stages``: resumable train/eval/sample stages as subprocesses; ``report``: table, plots, samples.
"""
