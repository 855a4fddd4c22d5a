"""Small helpers shared by the tests that compare run directories."""

import csv


def rows_without_time(path):
    """The rows of a ``metrics.csv`` as dicts of strings, without the wall-clock column."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r.pop("elapsed_s")
    return rows
