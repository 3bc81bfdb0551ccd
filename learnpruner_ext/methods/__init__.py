"""Registered pruning methods. Importing this package registers all of them."""

from .base import (
    DecoderContext,
    MethodPlan,
    MethodSpec,
    PruningMethod,
    VisionContext,
    VisionSelection,
    available_methods,
    create_method,
    get_method_class,
    plan_method,
    register_method,
)
from . import none, learnpruner  # noqa: F401  (registration side effect)
from . import atp, atp_fixed, cls_attention, dart, divprune, downsample, fastv, pyramiddrop, random_pruning, sparsevlm, vispruner, visionzip  # noqa: F401

__all__ = [
    "DecoderContext",
    "MethodPlan",
    "MethodSpec",
    "PruningMethod",
    "VisionContext",
    "VisionSelection",
    "available_methods",
    "create_method",
    "get_method_class",
    "plan_method",
    "register_method",
]
