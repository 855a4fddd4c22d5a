"""One run: the training loop with its readings (``runner``), the optional trace and density
readings (``readings``), per-block readings and batch sharpness (``layers``), re-measuring a run's
saved weights (``remeasure``, ``samedge measure``) and the launcher of ``--nproc`` (``launcher``).
"""
