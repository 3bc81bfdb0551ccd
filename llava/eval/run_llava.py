"""Answer one question about one image (or one video, Video-LLaVA), optionally with visual-token pruning.

    python -m llava.eval.run_llava --model-path P --image-file F --query Q \
        --pruning-method learnpruner --visual-token-budget 64 --lpm-path L [--json]
    python -m llava.eval.run_llava --model-path VIDEO_LLAVA --video-file F.mp4 [--num-frames 8] --query Q ...
"""

from __future__ import annotations

import argparse
import json
import sys

from learnpruner_ext.cli import add_pruning_args, pruning_config_from_args, run_main
from learnpruner_ext.config import budget_notice

from ..inference import GenerationSettings, build_prompt, generate_answers
from ..mm_utils import load_image
from .answer_loop import add_image_pixel_args
from ..model.builder import DEFAULT_MODEL_PATH, image_pixels_for, load_pretrained_model
from ..constants import VIDEO_FRAMES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default=None, help="checkpoint folder (default: the built-in toy model)")
    parser.add_argument("--model-base", default=None)
    visual = parser.add_mutually_exclusive_group(required=True)
    visual.add_argument("--image-file")
    visual.add_argument("--video-file", help="a video (Video-LLaVA checkpoints): --num-frames frames sampled uniformly")
    parser.add_argument("--num-frames", type=int, default=VIDEO_FRAMES, help="frames sampled from --video-file")
    parser.add_argument("--query", required=True)
    parser.add_argument("--conv-mode", default="vicuna_v1")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--num_beams", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the answer and accounting")
    add_image_pixel_args(parser)
    add_pruning_args(parser)
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Answer and print; bad input raises ``ValueError`` / ``FileNotFoundError`` (the CLI prints ``error: ...``)."""
    args = build_parser().parse_args(argv)
    pruning = pruning_config_from_args(args)
    settings = GenerationSettings(args.temperature, args.top_p, args.num_beams, args.max_new_tokens)
    build_prompt(args.query, args.conv_mode)  # an empty query or two <image> fail before the model loads
    pixels = image_pixels_for(args.model_path or DEFAULT_MODEL_PATH, args.min_pixels, args.max_pixels)
    if args.image_file:
        image = load_image(args.image_file)
    else:
        from ..video import load_video  # PyAV, the video extra

        image = load_video(args.video_file, args.num_frames)
    tokenizer, model, processor, _ = load_pretrained_model(
        args.model_path, args.model_base, device=args.device, dtype=args.dtype, pruning=pruning, image_pixels=pixels
    )
    notice = budget_notice(model.pruner.plan, pruning.budget, pruning.method) if model.pruner is not None else None
    if notice:
        print(f"note: {notice}", file=sys.stderr)
    [answer] = generate_answers(model, tokenizer, processor, [image], [args.query], args.conv_mode, settings)
    trace = model.last_pruning_trace()
    result = {"answer": answer, "method": pruning.method, "budget": pruning.budget, **trace.summary()}
    if args.json:
        print(json.dumps(result))
    else:
        print(answer)
        print(
            f"[{pruning.method}] R1={result['r1']} R2={result['r2']} k={result['layer']} "
            f"avg vision tokens/layer={result['average_vision_tokens']:.1f} of {result['num_vision_tokens']}",
            file=sys.stderr,
        )
    return result


if __name__ == "__main__":
    run_main(main)
