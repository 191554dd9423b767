"""Metrics, thresholds, localisation, run folders and the HTML report."""
