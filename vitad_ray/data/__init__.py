"""Frames in: sources (manifests, frame folders, videos), decoding, the embeddings contract, the generated demo scene."""
