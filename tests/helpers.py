"""Small helpers shared by the tests that compare run directories."""

import csv


def rows_without_time(path):
    """The rows of a ``metrics.csv`` as dicts of strings, without the wall-clock column."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r.pop("elapsed_s")
    return rows


def as_earlier_samedge(payload):
    """A checkpoint's payload with the update rule's state written as formats 1 and 2 of an earlier
    samedge held it: heavy-ball SGD's ``velocity`` (None without momentum) instead of ``rule`` and
    ``rule_state``.  The caller sets ``format`` and removes what that format lacked."""
    assert payload.pop("rule") == "sgd"
    state = payload.pop("rule_state")
    payload["velocity"] = state.get("velocity") if state else None
    return payload
