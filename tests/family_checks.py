"""Checks every VLM family's tests run the same way (imported by tests/test_llava_next.py, tests/test_qwen2_5_vl.py)."""

from __future__ import annotations


def assert_batch_equals_singles(model, make_batch, images, questions, generate_kwargs) -> None:
    """Generated tokens and kept slots (both stages) of one mixed batch equal each (image, question) run alone;
    ``make_batch(images, questions)`` builds the family's inputs."""
    batch = make_batch(images, questions)
    batched = model.generate(**batch, **generate_kwargs)[:, batch["input_ids"].shape[1] :]
    trace = model.last_pruning_trace()
    for i in range(len(images)):
        single_batch = make_batch(images[i : i + 1], questions[i : i + 1])
        single = model.generate(**single_batch, **generate_kwargs)[0, single_batch["input_ids"].shape[1] :]
        one = model.last_pruning_trace()
        assert single.tolist() == batched[i].tolist(), f"image {i}"
        assert trace.stage1_index[i][trace.stage1_index[i] >= 0].tolist() == one.stage1_index[0].tolist(), f"image {i}"
        if trace.stage2_index is not None:
            kept2 = trace.stage2_index[i][trace.stage2_index[i] >= 0].tolist()
            alone = one.stage2_index[0] if one.stage2_index is not None else one.stage1_index[0]  # None: kept all
            assert kept2 == alone.tolist(), f"image {i}"
