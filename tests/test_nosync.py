"""Forward passes without transformers' host sync on position ids (kbit.evaluation.speed.nosync)."""

from __future__ import annotations

import pytest
import torch
from models import ARCHS, tiny_model, tiny_tokenizer
from transformers import masking_utils

from kbit.evaluation.lm import make_lm
from kbit.evaluation.speed.nosync import consecutive_positions

#: families whose forward builds arange position ids and hands them to create_causal_mask
OWN_POSITIONS = ("gpt_neox", "gpt2", "llama")


@pytest.mark.parametrize("arch", OWN_POSITIONS)
def test_the_check_is_skipped_and_the_logits_stay(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The packed-sequence check runs on every plain forward of these families (so skipping
    it matters), not inside ``consecutive_positions``, and the logits are the same bits."""
    calls = []
    original = masking_utils.find_packed_sequence_indices

    def counting(position_ids: torch.Tensor) -> torch.Tensor | None:
        calls.append(tuple(position_ids.shape))
        return original(position_ids)

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", counting)
    model = tiny_model(arch)
    inps = torch.randint(
        0, model.config.vocab_size, (3, 29), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        plain = model(inps, use_cache=False).logits
        assert calls, f"{arch}: transformers no longer checks position ids; nosync is stale"
        calls.clear()
        with consecutive_positions():
            skipped = model(inps, use_cache=False).logits
    assert calls == []
    assert torch.equal(plain, skipped)
    assert masking_utils.find_packed_sequence_indices is counting  # restored on exit


def test_other_position_ids_still_go_through_the_check() -> None:
    """Several distinct rows (ids a caller passed) are checked as before: packing is found."""
    packed = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]])
    want = masking_utils.find_packed_sequence_indices(packed)
    with consecutive_positions():
        got = masking_utils.find_packed_sequence_indices(packed)
        own = masking_utils.find_packed_sequence_indices(torch.arange(5)[None].expand(4, -1))
    assert want is not None and torch.equal(got, want)
    assert own is None


def test_the_check_is_restored_after_an_error() -> None:
    original = masking_utils.find_packed_sequence_indices
    with pytest.raises(RuntimeError), consecutive_positions():
        raise RuntimeError("boom")
    assert masking_utils.find_packed_sequence_indices is original


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("arch", ARCHS)
def test_scoring_forward_never_waits_for_the_device(arch: str) -> None:
    """ReusingHFLM's forward pass issues no device-to-host sync on any family, so the host can
    queue the next batch while the GPU runs this one; the logits equal HFLM's."""
    model = tiny_model(arch, hidden=2048, heads=16).to("cuda", torch.float16)
    tok = tiny_tokenizer(arch)
    lm, stock = make_lm(model, tok, 4), make_lm(model, tok, 4, kv_cache=True)
    inps = torch.randint(0, model.config.vocab_size, (16, 77), device="cuda")
    want = stock._model_call(inps)
    lm._model_call(inps)  # first call: lazily created handles may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = lm._model_call(inps)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(got, want), arch
