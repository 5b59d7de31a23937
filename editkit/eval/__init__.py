"""Metrics (pixel, masked, feature), the evaluation runner, comparisons and the HTML report."""
