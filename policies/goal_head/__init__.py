"""The goal-conditioned policy head (and, with ``goal: none``, the behaviour-cloning baseline)."""

from policies.goal_head.configuration_goal_head import GoalHeadConfig
from policies.goal_head.modeling_goal_head import GoalHeadPolicy

__all__ = ["GoalHeadConfig", "GoalHeadPolicy"]
