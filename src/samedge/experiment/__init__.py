"""Experiments: configuration, tasks, the runner, run directories, metrics files, checkpoints,
figures and the command line.  Built on :mod:`samedge.core`; nothing in the core imports this."""
