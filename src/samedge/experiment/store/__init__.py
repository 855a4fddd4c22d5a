"""One run directory's files: their names and the one reader of the saved settings (``layout``:
:class:`~samedge.experiment.store.layout.RunDir`), creating and replacing a run directory
(``create``), its lock (``lock``), checkpoints, ``metrics.csv`` and ``steps.csv`` (``metrics``),
``density.csv``, ``layers.csv``, and atomic writes and safe JSON reads (``files``).

Nothing here trains or measures; the rooms above ask these modules for every file they touch.
"""
