"""No pruning: the unpruned model, the reference every table row is compared to (upstream LLaVA-1.5's forward)."""

from ..config import TokenPlan, check_budget
from .base import PruningMethod, register_method


@register_method
class NoPruning(PruningMethod):
    name = "none"
    paper = "-"
    acts_at = "nowhere"

    @classmethod
    def make_plan(cls, spec, num_vision_tokens: int, num_layers: int) -> TokenPlan:
        check_budget(spec.config.budget, num_vision_tokens)  # still reject nonsense budgets
        return TokenPlan(num_vision_tokens, num_layers, r1=num_vision_tokens)
