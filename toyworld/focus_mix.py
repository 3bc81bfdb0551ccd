"""Training mixes for a short extra VQA phase: a sample of the full mix plus extra turns of chosen question types.

    python -m toyworld.focus_mix --data playground/data/toy/train.json --types position \
        --question-regex left --base-samples 20000 --out outputs/toy/train_focus_b.json

Why: after the main VQA stage the toy base answered top/bottom from the image tokens' sequence positions
(98 % held-out) but left/right at chance (48.6 %), although every patch feature encodes its column (the
vision pretraining's ``col`` head is 100 % accurate). A mix of the full data plus every position turn once
more did not change that in 11 minutes; left/right turns alone taught it within an epoch (98.6 % held-out)
but made the base forget the other types, which a second, mixed epoch brings back (scripts/toy/train_all.sh,
stage 4). Only the base's training recipe changes: the test split and its question mix stay as generated.

Output: a LLaVA-665K-style JSON, shuffled, of ``base_samples`` conversations drawn from ``data`` (seeded,
without replacement) plus, ``copies`` times, every QA turn of the chosen ``types`` (and matching
``question_regex``, if given) as conversations of their own (one per image; ``<image>`` on the first turn).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from .generate import QUESTION_MIX, question_type


def focus_mix(conversations: list[dict], types: list[str], base_samples: int, copies: int = 1,
              seed: int = 0, question_regex: str | None = None) -> list[dict]:
    unknown = sorted(set(types) - set(QUESTION_MIX))
    if unknown:
        raise ValueError(f"unknown question type(s) {unknown}; choose from {list(QUESTION_MIX)}")
    if not 0 <= base_samples <= len(conversations):
        raise ValueError(f"base_samples must be in [0, {len(conversations)}] (the conversations in the data), "
                         f"got {base_samples}")
    if copies < 0:
        raise ValueError(f"copies must be >= 0, got {copies}")
    pattern = re.compile(question_regex) if question_regex else None
    rng = random.Random(seed)
    mix = rng.sample(conversations, base_samples)
    focused = []
    for sample in conversations:
        turns = sample["conversations"]
        kept = []
        for human, gpt in zip(turns[0::2], turns[1::2]):
            question = human["value"].replace("<image>", "").strip()
            if question_type(question) in types and (pattern is None or pattern.search(question)):
                kept += [{"from": "human", "value": question}, dict(gpt)]
        if kept:
            kept[0]["value"] = "<image>\n" + kept[0]["value"]
            focused.append({"id": sample["id"] + "_focus", "image": sample["image"], "conversations": kept})
    mix += focused * copies
    if not mix:
        raise ValueError(f"the mix is empty: no {types} turn matches question_regex={question_regex!r} and "
                         f"base_samples is 0; check the types and the regex")
    rng.shuffle(mix)
    return mix


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="LLaVA-665K-style training JSON (e.g. playground/data/toy/train.json)")
    ap.add_argument("--types", required=True, help=f"comma-separated question types from {list(QUESTION_MIX)}")
    ap.add_argument("--base-samples", type=int, required=True, help="conversations drawn from the full mix")
    ap.add_argument("--copies", type=int, default=1, help="how often the chosen types' turns are repeated")
    ap.add_argument("--question-regex", help="only the chosen types' questions matching this regex (e.g. 'left')")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    conversations = json.loads(Path(args.data).read_text())
    mix = focus_mix(conversations, args.types.split(","), args.base_samples, args.copies, args.seed,
                    args.question_regex)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(mix))
    print(f"[focus_mix] {len(mix)} conversations ({args.base_samples} from the full mix + "
          f"{len(mix) - args.base_samples} with {args.types} only) -> {args.out}")


if __name__ == "__main__":
    main()
