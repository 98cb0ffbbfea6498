"""Policy heads: what turns observations (and a subgoal) into robot actions.

One folder per policy, LeRobot's shape: ``configuration_<name>.py`` (a config dataclass) beside
``modeling_<name>.py`` (the module, with ``reset``, ``select_action``, ``predict_action_chunk`` and
``forward -> (loss, logs)``).

- :mod:`policies.goal_head`: current frame + subgoal keyframe + proprioception -> action chunk; with
  ``goal: none`` the behaviour-cloning baseline.
- :mod:`policies.act`: LeRobot's ACT, trained by ``lerobot-train`` on the same datasets, loaded with
  LeRobot's own processors for comparison.
"""
