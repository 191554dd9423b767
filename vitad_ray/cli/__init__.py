"""The ``vitad`` command: parse, check inputs before Ray starts, call the engine."""
