"""Nearest-neighbour search (exact, on CPU or GPU) and coreset selection."""

# How the paper recipe searches a scope: "exact" (in-memory matrix products) or "chroma" (the
# stores' HNSW indexes).
INDEXES = ("exact", "chroma")
