"""LearnPruner: two-stage visual-token pruning for LLaVA-family models, and the methods it is compared to."""

from .config import BudgetError, PruningConfig, TokenPlan, UnsupportedMethodError
from .lpm import LearnablePruningModule
from .methods import available_methods, create_method, register_method
from .modeling import (
    PrunableLlavaForConditionalGeneration,
    PrunableLlavaNextForConditionalGeneration,
    PruningTrace,
    apply_pruning,
)

__all__ = [
    "BudgetError",
    "LearnablePruningModule",
    "PrunableLlavaForConditionalGeneration",
    "PrunableLlavaNextForConditionalGeneration",
    "PruningConfig",
    "PruningTrace",
    "TokenPlan",
    "UnsupportedMethodError",
    "apply_pruning",
    "available_methods",
    "create_method",
    "register_method",
]
