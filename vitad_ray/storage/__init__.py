"""The model directory: Chroma stores, paths and documents, package versions."""
