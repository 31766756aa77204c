"""GPU experiments not yet made a default by a GPU run (lab/README.md). Not installed; imported from a
checkout of the repository (its root on sys.path, as ``python -m`` from the root gives)."""
