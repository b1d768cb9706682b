"""Evaluation: metrics (F2, baseline), threshold tuning, `chiptag evaluate` and the run report."""
