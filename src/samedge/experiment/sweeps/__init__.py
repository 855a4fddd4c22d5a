"""Many runs: sweep definitions and points (``spec``), the sweep directory's own files and lock
(``sweepdir``), running a sweep (``driver``) one point at a time (``point``), by an executor of the
registry in ``executors/`` (serial, Ray, SLURM through submitit), and the paper's sweep files
(``grids/``, what ``samedge reproduce`` runs).
"""
