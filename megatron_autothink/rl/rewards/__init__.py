"""Rule-based rewards, by layer (each module only imports the ones above it):

* :mod:`.extract`: answer extraction (``\\boxed{}``, ``<answer>``, ``Answer:``, choice letters,
  "wait" counts); pure string functions, linear time. The think format itself
  (``think_mode``, ``is_thinking``) is :mod:`megatron_autothink.modes`'.
* :mod:`.verifier`: math-verify in a worker process behind a hard wall-clock limit.
* :mod:`.graders`: accuracy graders (math, multiple choice) and format checks.
* :mod:`.rubric`: :class:`Rubric`, the recipe reward built from ``config.RewardWeights``; the one
  scorer RL rollouts and ``autothink eval`` call.
"""

from megatron_autothink.rl.rewards.extract import count_waits, extract_answer
from megatron_autothink.rl.rewards.rubric import Rubric, Score

__all__ = ["Rubric", "Score", "count_waits", "extract_answer"]
