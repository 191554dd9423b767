"""Frozen ViT backbones: the registry and one adapter per family."""
