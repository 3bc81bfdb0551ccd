"""Constants of the llava tree. ``IGNORE_INDEX`` (label of unsupervised positions) is defined once, in the
pruning core whose loss skips it, and re-exported here."""

from learnpruner_ext.training.losses import IGNORE_INDEX  # noqa: F401

DEFAULT_IMAGE_TOKEN = "<image>"
VIDEO_FRAMES = 8  # frames Video-LLaVA samples uniformly from a video (PKU-YuanGroup/Video-LLaVA, processing_video.py)
