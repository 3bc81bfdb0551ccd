"""The cut's index arithmetic and the family-agnostic RoPE used for exact attention rows."""

import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from learnpruner_ext.cut import SequenceCut, left_pad, right_pad
from learnpruner_ext.scoring import apply_rope


def test_from_keep_re_left_pads_each_row():
    """Row 0 keeps positions {1, 3} (2), row 1 keeps {0, 2, 3} (3): width 3, row 0 gets one padding slot first."""
    keep = torch.tensor([[False, True, False, True], [True, False, True, True]])
    cut = SequenceCut.from_keep(0, keep)
    assert cut.index.tolist() == [[0, 1, 3], [0, 2, 3]]
    assert cut.valid.tolist() == [[False, True, True], [True, True, True]]
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert cut.mask(mask).tolist() == [[0, 1, 1], [1, 1, 1]] and cut.mask(None).tolist() == [[0, 1, 1], [1, 1, 1]]


def test_gather_positions_handles_mrope_axes():
    """M-RoPE positions [3, B, S] are gathered on each of the 3 axes like [B, S] positions."""
    keep = torch.tensor([[True, False, True], [False, True, True]])
    cut = SequenceCut.from_keep(2, keep)
    pos = torch.arange(3 * 2 * 3).view(3, 2, 3)
    got = cut.gather_positions(pos)
    assert got.shape == (3, 2, 2)
    assert all(torch.equal(got[a], cut.gather(pos[a])) for a in range(3))
    assert got[1].tolist() == [[6, 8], [10, 11]]


def test_pad_helpers():
    rows = [torch.tensor([1, 2]), torch.tensor([3])]
    assert left_pad(rows, -1).tolist() == [[1, 2], [-1, 3]] and right_pad(rows, -1).tolist() == [[1, 2], [3, -1]]


def test_apply_rope_equals_transformers_llama():
    """Our rotate-half RoPE equals transformers' Llama apply_rotary_pos_emb on random q/k."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=128)
    rope = LlamaRotaryEmbedding(cfg)
    x = torch.randn(2, 4, 7, 16)
    positions = torch.tensor([[0, 1, 2, 5, 6, 9, 30], [3, 4, 5, 6, 7, 8, 9]])
    cos, sin = rope(x, positions)
    q_ref, k_ref = apply_rotary_pos_emb(x, x * 2, cos, sin)
    assert torch.allclose(apply_rope(x, cos, sin), q_ref, atol=1e-6)
    assert torch.allclose(apply_rope(x * 2, cos, sin), k_ref, atol=1e-6)


def test_stage_timer_sections_cover_both_stages(tiny_hf, images):
    """The core's timing hooks record every section of a LearnPruner prefill, and nothing once detached."""
    from learnpruner_ext import PruningConfig, apply_pruning
    from learnpruner_ext.timing import StageTimer
    from llava.inference import build_prompt, prepare_batch
    from llava.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(str(tiny_hf), None, None, device="cpu", dtype="float32")
    import pytest

    with pytest.warns(UserWarning, match="UNTRAINED"):
        apply_pruning(model, PruningConfig("learnpruner", 6))
    batch = prepare_batch(model, tokenizer, processor, images[:1], [build_prompt("What is shown?")])
    timer = StageTimer("cpu")
    model.model.set_stage_timer(timer)
    with torch.no_grad():
        model(**batch)
    sections = {"vision_tower", "stage1_select", "lpm", "diversity", "projector", "stage2_select", "stage2_cut"}
    assert set(timer.seconds) == sections and all(v > 0 for v in timer.seconds.values())
    assert timer.seconds["lpm"] <= timer.seconds["stage1_select"]
    model.model.set_stage_timer(None)
    before = dict(timer.seconds)
    with torch.no_grad():
        model(**batch)
    assert timer.seconds == before
