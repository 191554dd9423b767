"""vitad_ray: unsupervised visual anomaly detection for fixed-view cameras, on Ray."""

__version__ = "0.1.0"
