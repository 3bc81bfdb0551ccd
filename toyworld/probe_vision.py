"""Held-out linear probe of a toy vision tower: does each patch token say what lies under it?

    python -m toyworld.probe_vision --model checkpoints/toy-llava --data playground/data/toy \\
        [--train-images 2000] [--steps 400]

Extracts the feature-layer tokens (what the projector and the LPM read) of the first ``--train-images``
training images and of the held-out test images, fits one linear classifier per target of
:mod:`toyworld.pretrain_vision` on the training tokens, and reports accuracy on the test
tokens, over all patches and over the patches that show something (``@obj``: an object for colour/shape,
an object centre for ``center``, letter ink for ``glyph``). The pretraining log's accuracies are measured
on the batches it trains on; this is the held-out check to run before the VQA stage.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from .pretrain_vision import HEADS, IGNORE, NONE_CLASS, load_split, normalize

PROBED = ("color", "shape", "center", "glyph")


@torch.no_grad()
def features(model, images_u8: torch.Tensor, batch: int = 100) -> torch.Tensor:
    """uint8 [N, 3, S, S] -> [N * grid², Dv] feature-layer patch tokens (fp32)."""
    tower = model.model
    return torch.cat([tower.vision_features(normalize(images_u8[i:i + batch])).float()
                      for i in range(0, len(images_u8), batch)]).flatten(0, 1)


def probe(model_path: str, data: str, train_images: int = 2000, steps: int = 400, seed: int = 0) -> dict:
    from llava.model.builder import load_pretrained_model

    _, model, _, _ = load_pretrained_model(model_path, device="cpu", dtype="float32")
    model.eval()
    x_train_u8, t_train = load_split(data, train_images, "train")
    x_test_u8, t_test = load_split(data, None, "test")
    x_train, x_test = features(model, x_train_u8), features(model, x_test_u8)
    t_train, t_test = t_train.flatten(0, 1), t_test.flatten(0, 1)
    gen = torch.Generator().manual_seed(seed)
    names = list(HEADS)
    out = {}
    for name in PROBED:
        j = names.index(name)
        y_train, y_test = t_train[:, j], t_test[:, j]
        rare_train = (y_train != NONE_CLASS[name]) & (y_train != IGNORE)
        torch.manual_seed(seed)
        head = torch.nn.Linear(x_train.shape[1], HEADS[name])
        opt = torch.optim.Adam(head.parameters(), lr=1e-2)
        rare_idx = rare_train.nonzero().squeeze(1)
        for _ in range(steps):  # half the batch from the rare patches, as the pretraining loss weights them
            idx = torch.cat([torch.randint(len(y_train), (2048,), generator=gen),
                             rare_idx[torch.randint(len(rare_idx), (2048,), generator=gen)]])
            loss = F.cross_entropy(head(x_train[idx]), y_train[idx], ignore_index=IGNORE)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            pred = head(x_test).argmax(-1)
        valid = y_test != IGNORE
        rare = valid & (y_test != NONE_CLASS[name])
        out[name] = round(100 * (pred[valid] == y_test[valid]).float().mean().item(), 1)
        out[name + "@obj"] = round(100 * (pred[rare] == y_test[rare]).float().mean().item(), 1)
        out[name + "@obj_n"] = int(rare.sum())
    return {"model": model_path, "train_images": len(x_train_u8), "test_images": len(x_test_u8), "accuracy": out}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint whose vision tower is probed (e.g. outputs/toy/init)")
    ap.add_argument("--data", default="playground/data/toy", help="toy data folder (train/test scenes and images)")
    ap.add_argument("--train-images", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    result = probe(args.model, args.data, args.train_images, args.steps, args.seed)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
