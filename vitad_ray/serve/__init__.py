"""The Ray Serve endpoint: the app, its HTTP contract and limits, stream state."""
