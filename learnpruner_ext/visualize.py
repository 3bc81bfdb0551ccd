"""Which patches a pruning method keeps, drawn on the image (paper Fig. 6 style): drawing code only.

The command line that loads a model, answers and saves the side-by-side figure is
``python -m llava.serve.visualize`` (``llava/serve/visualize.py``); this module needs no model.

The overlay is drawn on the *padded square* image the model actually sees (``image_aspect_ratio='pad'``
centres the image on a square of the processor's mean colour; the patch grid refers to that square).
Every patch gets one of four looks:

* pruned before the LLM: dimmed;
* kept by stage 1 for importance: amber frame and amber centre square;
* kept by stage 1 for diversity: cyan frame and cyan centre square;
* kept by stage 2 (inside the LLM, from layer k on): the centre square is red (the frame keeps its
  stage-1 colour).

So the centre pixel of a patch tells its final status and ``count_marks`` can recount R1/R2/D from pixels.
The demo (``llava.serve.gradio_web_server``) uses the same drawing code.

LLaVA-NeXT (anyres) has no single grid: its tokens come from a base crop (the whole image resized, not padded, to
one tower input, as transformers' ``LlavaNextImageProcessor.get_image_patches`` makes it) plus a grid of
high-resolution crops. :func:`base_crop_patches` picks the base crop's patches out of an image's packing map
(``learnpruner_ext.adapters.llava_next``), and ``draw_overlay(..., fit="squash")`` draws them on the resized
image; the hi-res crops are not drawn, and the legend says that its counts are the base crop's only.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

STAGE1_COLOR = (255, 190, 0)  # amber: kept by stage 1 for importance
DIVERSE_COLOR = (0, 220, 255)  # cyan: kept by stage 1 for diversity
STAGE2_COLOR = (255, 0, 60)  # red: kept by stage 2
DIM = 0.3  # brightness of pruned patches (so no dimmed pixel can equal a marker colour)
LEGEND_HEIGHT = 64
NOTE_HEIGHT = 20  # one extra legend line (draw_overlay's note)
FITS = ("pad", "squash")  # how the image becomes the square the patch grid refers to


@dataclass
class PatchMarks:
    """Per-patch status of one image (patch indices into the ``grid x grid`` raster of the padded square)."""

    grid: int
    stage1: list[int]  # kept before the LLM (R1 of them)
    diverse: list[int]  # subset of stage1 picked for diversity
    stage2: list[int] | None  # kept from layer k on (R2), subset of stage1; None = no in-LLM stage

    @classmethod
    def from_trace(cls, trace, grid: int, row: int = 0, patch_of_slot: dict[int, int] | None = None) -> "PatchMarks":
        """From ``model.last_pruning_trace()`` (batch row ``row``). The trace holds placeholder slots;
        ``patch_of_slot`` maps the slots to draw onto grid patches (LLaVA-NeXT: :func:`base_crop_patches`; the
        other slots are left out); None: slot = patch (LLaVA-1.5). Empty slots (-1) are skipped."""
        def patches(slots):
            if patch_of_slot is None:
                return sorted({s for s in slots if s >= 0})
            return sorted({patch_of_slot[s] for s in slots if s in patch_of_slot})

        all_slots = range(grid * grid) if patch_of_slot is None else patch_of_slot
        stage1 = patches(trace.stage1_index[row].tolist() if trace.stage1_index is not None else all_slots)
        diverse = []
        if trace.stage1_diverse is not None:
            idx, flag = trace.stage1_index[row].tolist(), trace.stage1_diverse[row].tolist()
            diverse = patches([i for i, f in zip(idx, flag) if f])
        stage2 = patches(trace.stage2_index[row].tolist()) if trace.stage2_index is not None else None
        return cls(grid=grid, stage1=stage1, diverse=diverse, stage2=stage2)

    def counts(self) -> dict:
        return {
            "r1": len(self.stage1),
            "diverse": len(self.diverse),
            "r2": len(self.stage2) if self.stage2 is not None else None,
            "pruned": self.grid * self.grid - len(self.stage1),
        }


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType size support
        return ImageFont.load_default()


def pad_to_square(image: Image.Image, background=(122, 116, 104)) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The padded square the model sees, plus the box ``(x0, y0, x1, y1)`` of the original image in it.

    Upstream LLaVA's ``expand2square`` (``image_aspect_ratio='pad'``): the RGB image centred on a
    ``max(w, h)`` square of ``background``, offsets rounded down; a square image is returned as is.
    ``background`` is the processor's mean colour as :func:`processor_background` gives it.
    """
    image = image.convert("RGB")
    w, h = image.size
    side = max(w, h)
    x0, y0 = (side - w) // 2, (side - h) // 2
    box = (x0, y0, x0 + w, y0 + h)
    if w == h:
        return image, box
    square = Image.new("RGB", (side, side), tuple(background))
    square.paste(image, (x0, y0))
    return square, box


def base_crop_patches(packing_map, patches_per_crop: int) -> dict[int, int]:
    """LLaVA-NeXT: ``{placeholder slot: base-crop patch}`` from one image's packing map (``LlavaNextAdapter.
    packing_maps``: slot -> crop-major source ``crop * P + patch``, -1 for a newline). The base crop is crop 0,
    so its patches are the sources ``0 <= source < P``; slots of the hi-res crops and newlines are left out."""
    return {slot: src for slot, src in enumerate(packing_map.tolist()) if 0 <= src < patches_per_crop}


def cell_size(grid: int, display: int = 448) -> int:
    return max(12, math.ceil(display / grid))


def draw_overlay(
    image: Image.Image,
    marks: PatchMarks,
    background=(122, 116, 104),
    display: int = 448,
    legend: bool = True,
    crop: bool = False,
    fit: str = "pad",
    note: str | None = None,
) -> Image.Image:
    """Overlay ``marks`` on the square the grid refers to; returns an RGB image of ``grid*cell`` square
    (plus a ``LEGEND_HEIGHT`` legend strip below when ``legend``). ``fit``: ``"pad"`` the padded square
    (LLaVA-1.5's ``image_aspect_ratio='pad'``), ``"squash"`` the image resized to a square (LLaVA-NeXT's base
    crop). ``crop`` cuts the padding back off (the patch-centre geometry then no longer starts at 0,0).
    ``note``: one more legend line (e.g. which tokens the counts cover)."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    g = marks.grid
    cell = cell_size(g, display)
    side = g * cell
    if fit == "pad":
        square, box = pad_to_square(image, background)
    else:
        square = image.convert("RGB")
        box = (0, 0, square.width, square.height)
    base = np.asarray(square.resize((side, side), Image.BICUBIC), dtype=np.float32)
    kept = np.zeros((g, g), dtype=bool)
    kept.flat[marks.stage1] = True
    mask = np.kron(kept, np.ones((cell, cell), dtype=bool))
    base[~mask] *= DIM
    out = Image.fromarray(base.clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(out)
    frame = max(2, cell // 16)
    dot = max(2, cell // 8)
    diverse = set(marks.diverse)
    stage2 = set(marks.stage2 or ())
    for p in marks.stage1:
        r, c = divmod(p, g)
        x0, y0 = c * cell, r * cell
        colour = DIVERSE_COLOR if p in diverse else STAGE1_COLOR
        draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], outline=colour, width=frame)
        cx, cy = x0 + cell // 2, y0 + cell // 2
        draw.rectangle([cx - dot, cy - dot, cx + dot, cy + dot], fill=STAGE2_COLOR if p in stage2 else colour)
    if crop and fit == "pad":
        scale = side / square.width
        out = out.crop(tuple(round(v * scale) for v in box))
    if legend:
        out = _add_legend(out, marks, note)
    return out


def _add_legend(image: Image.Image, marks: PatchMarks, note: str | None = None) -> Image.Image:
    counts = marks.counts()
    height = LEGEND_HEIGHT + (NOTE_HEIGHT if note else 0)
    canvas = Image.new("RGB", (max(image.width, 300), image.height + height), (255, 255, 255))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = _font(13)
    entries = [
        (STAGE1_COLOR, f"stage 1 kept (importance): {counts['r1'] - counts['diverse']}"),
        (DIVERSE_COLOR, f"stage 1 kept (diversity): {counts['diverse']}"),
        (STAGE2_COLOR, f"stage 2 kept: {counts['r2'] if counts['r2'] is not None else '-'}"),
        ((60, 60, 60), f"pruned (dimmed): {counts['pruned']}"),
    ]
    for i, (colour, text) in enumerate(entries):
        x = 6 + (i % 2) * (canvas.width // 2)
        y = image.height + 6 + (i // 2) * 28
        draw.rectangle([x, y + 2, x + 14, y + 16], fill=colour, outline=(0, 0, 0))
        draw.text((x + 20, y + 1), text, fill=(0, 0, 0), font=font)
    if note:
        draw.text((6, image.height + LEGEND_HEIGHT), note, fill=(0, 0, 0), font=font)
    return canvas


def count_marks(overlay: Image.Image, grid: int, display: int = 448) -> dict:
    """Recount the marks from the pixels of an (uncropped) overlay: the centre pixel of each patch."""
    cell = cell_size(grid, display)
    arr = np.asarray(overlay.convert("RGB"))
    out = {"r1": 0, "diverse": 0, "r2": 0}
    for p in range(grid * grid):
        r, c = divmod(p, grid)
        centre = tuple(int(v) for v in arr[r * cell + cell // 2, c * cell + cell // 2])
        corner = tuple(int(v) for v in arr[r * cell, c * cell])  # on the frame
        if centre in (STAGE1_COLOR, DIVERSE_COLOR, STAGE2_COLOR):
            out["r1"] += 1
        if centre == STAGE2_COLOR:
            out["r2"] += 1
        if corner == DIVERSE_COLOR:
            out["diverse"] += 1
    return out


def processor_background(image_processor) -> tuple[int, int, int]:
    return tuple(int(x * 255) for x in image_processor.image_mean)  # truncated, as upstream's process_images


def check_single_grid(model) -> None:
    """The overlays draw one square patch grid; LLaVA-NeXT packs several crops (anyres), so refuse it clearly."""
    family = getattr(model, "family", "llava")
    if family != "llava":
        raise ValueError(f"kept-patch overlays draw one square grid, but this is a {family!r} checkpoint whose "
                         f"images are packed from several crops; use a LLaVA-1.5 checkpoint for the overlays, or "
                         f"run_llava --json for the per-image token accounting (the Gradio demo draws a NeXT "
                         f"image's base-crop patches only)")


def model_grid(model) -> int:
    return int(round(math.sqrt(model.num_vision_tokens)))


# ------------------------------------------------------------------------------------- figures


PANEL_MARGIN = 8


def compose_panels(panels: list[tuple[Image.Image, str, str]]) -> Image.Image:
    """Side-by-side panels, each ``max overlay width + 2*PANEL_MARGIN`` wide: title above, overlay, answer below."""
    margin, title_h, answer_h = PANEL_MARGIN, 24, 64
    panel_width = max(p[0].width for p in panels)
    font, small = _font(16), _font(13)
    height = max(p[0].height for p in panels)
    width = len(panels) * (panel_width + 2 * margin)
    canvas = Image.new("RGB", (width, title_h + height + answer_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (overlay, title, answer) in enumerate(panels):
        x = i * (panel_width + 2 * margin) + margin
        draw.text((x, 4), title, fill=(0, 0, 0), font=font)
        canvas.paste(overlay, (x, title_h))
        lines = textwrap.wrap(f"A: {answer}", width=max(20, panel_width // 8))[:3]
        for j, line in enumerate(lines):
            draw.text((x, title_h + height + 4 + 18 * j), line, fill=(0, 0, 0), font=small)
    return canvas
