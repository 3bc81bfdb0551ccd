"""lmms-eval integration: the ``learnpruner_llava`` model (``llava.eval.lmms.model``) and a toy-world task.

    lmms-eval --model learnpruner_llava \
        --model_args pretrained=P,pruning_method=learnpruner,visual_token_budget=64,lpm_path=L \
        --tasks pope,gqa --batch_size 8 --log_samples --output_path logs/

lmms-eval 0.7 finds models through ``MODEL_REGISTRY_V2``, which reads the ``lmms_eval.models`` entry-point group
(``setup.py`` points it at :func:`manifest`); the ``@register_model`` decorator alone does not make a model
visible there. This module imports nothing heavy: lmms-eval loads it while it builds its registry.
"""

MODEL_ID = "learnpruner_llava"
MODEL_CLASS_PATH = "llava.eval.lmms.model.LearnPrunerLlava"


def manifest():
    """The entry point's payload: the model's id and the class lmms-eval imports when the model is used."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS_PATH)
