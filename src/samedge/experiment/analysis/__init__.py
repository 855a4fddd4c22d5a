"""What is drawn and concluded from run directories, apart from training: a run's figures
(``figures``), figures that overlay runs (``overlay``, ``samedge compare``), the paper's claims
checked on measured runs (``claims``) and its reports (``report``, ``samedge reproduce``), and
the GD-against-SAM flatness check (``flatness``).
"""
