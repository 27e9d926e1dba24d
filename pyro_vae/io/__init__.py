"""Files: run directories claimed by one writer at a time, staged result files
(``rundir``), and checkpoints that hold only tensors and plain values (``checkpoints``).

Part of the foundation layer: it imports nothing of the package above it.
"""
