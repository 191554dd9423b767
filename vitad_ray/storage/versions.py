"""Versions of the packages whose behaviour a stored artefact depends on."""

from __future__ import annotations

from importlib import metadata

_PACKAGES = ("vitad_ray", "torch", "transformers", "timm", "ray", "chromadb", "hdbscan",
             "scikit-learn", "numpy")


def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out
