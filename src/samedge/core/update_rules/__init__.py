"""Update rules: an optimizer's step that owns its state, its preconditioner and its edge.

* :mod:`~samedge.core.update_rules.base` -- :class:`UpdateRule` (``init``, ``step``,
  ``preconditioner``, ``threshold``, ``state_dict``/``load_state_dict``) and :data:`RuleState`;
* :mod:`~samedge.core.update_rules.registry` -- :data:`UPDATE_RULES`, name -> rule class;
* :mod:`~samedge.core.update_rules.sgd` -- :class:`HeavyBallSGD` (``"sgd"``).
"""

from samedge.core.update_rules.base import RuleState, UpdateRule
from samedge.core.update_rules.registry import UPDATE_RULES
from samedge.core.update_rules.sgd import HeavyBallSGD

__all__ = ["UpdateRule", "RuleState", "UPDATE_RULES", "HeavyBallSGD"]
