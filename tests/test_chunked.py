"""Low-memory scoring: logits that do not fit are scored in blocks, to float32 rounding.

A forced small ``memory_budget`` makes :class:`~kbit.evaluation.speed.scoring.FastLM` take its
``head`` mode (body once, output head per block of rows) or its ``blocked`` mode (full logits,
log-softmax per block); both are compared with the exact path on tiny models of every
architecture. Models whose forward pass does more than the head are refused, and a batch that
cannot fit at all is refused before any forward pass, with the numbers and the setting to change.
"""

from __future__ import annotations

import pytest
import torch
from models import ARCHS, tiny_model, tiny_tokenizer

from kbit.evaluation.batch_size import (
    activation_bytes,
    logit_row_bytes,
    model_bytes,
    usable_memory_bytes,
)
from kbit.evaluation.lm import make_lm
from kbit.evaluation.speed.scoring import ChunkedHeadError, ScoringMemoryError

MAX_LENGTH = 120
BATCH = 4


def _requests(vocab: int, rolling: int = 100) -> list:
    """Short requests, two sharing a forward row, an over-long one and a rolling window."""
    gen = torch.Generator().manual_seed(3)

    def toks(lo: int, hi: int) -> list[int]:
        n = int(torch.randint(lo, hi, (1,), generator=gen))
        return torch.randint(10, vocab, (n,), generator=gen).tolist()

    reqs = [((f"c{i}", f"x{i}"), toks(1, 40), toks(1, 6)) for i in range(8)]
    base = list(range(100, 140))
    reqs += [
        (("a", "1"), base[:30], base[30:35]),
        (("b", "2"), base[:30], [*base[30:34], 7]),  # shares a forward row with "a"
        (("t", "3"), [5] * MAX_LENGTH, list(range(200, 205))),  # truncated from the left
        ((None, None), [1], [t % vocab for t in range(300, 300 + rolling)]),  # rolling window
    ]
    return reqs


def _head_budget(model: torch.nn.Module, rows: int) -> int:
    """Room for the activations of a full batch and ``rows`` rows of head logits, no more."""
    head = model.get_output_embeddings().weight
    vocab, hidden = head.shape
    per_row = (hidden + vocab) * 4 + logit_row_bytes(vocab, 4, 4, copy=False)
    return activation_bytes(model, BATCH, MAX_LENGTH + 1) + rows * per_row


@pytest.mark.parametrize("arch", ARCHS)
def test_head_per_block_equals_the_exact_path(arch: str) -> None:
    """Every architecture: log-likelihoods within float32 rounding, the same greedy flags, and
    the exact path (ample memory) stays the exact path."""
    model, tok = tiny_model(arch), tiny_tokenizer(arch)
    reqs = _requests(model.config.vocab_size)
    exact = make_lm(model, tok, BATCH, max_length=MAX_LENGTH)
    budget = _head_budget(model, 37)
    chunked = make_lm(model, tok, BATCH, max_length=MAX_LENGTH, memory_budget=budget)
    want = exact._loglikelihood_tokens(list(reqs))
    got = chunked._loglikelihood_tokens(list(reqs))
    # long batches take the head per block, the last (short) one still fits the exact path
    assert exact.modes_used == {"full"} and chunked.modes_used == {"head", "full"}
    assert [g for _, g in got] == [g for _, g in want]
    for (a, _), (b, _) in zip(got, want, strict=True):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), arch
    assert chunked.forward_tokens == exact.forward_tokens > 0
    assert chunked.forward_time_s > 0


def test_blocked_log_softmax_is_bit_exact() -> None:
    """Full logits that fit with a log-softmax that does not: blocks of rows, the same bits."""
    model, tok = tiny_model("gpt_neox"), tiny_tokenizer("gpt_neox")
    vocab = model.config.vocab_size
    length, batch = 320, 2
    reqs = _requests(vocab, rolling=300)
    logits = batch * length * vocab * 4
    rows = 75 * logit_row_bytes(vocab, 4, 4, copy=True)  # a quarter of the window's rows
    budget = activation_bytes(model, batch, length) + logits + rows
    exact = make_lm(model, tok, batch, max_length=length)
    blocked = make_lm(model, tok, batch, max_length=length, memory_budget=budget)
    assert blocked._loglikelihood_tokens(list(reqs)) == exact._loglikelihood_tokens(list(reqs))
    assert "blocked" in blocked.modes_used and "head" not in blocked.modes_used
    assert exact.modes_used == {"full"}


def test_windows_in_head_mode_equal_full_windows() -> None:
    """score_windows (each row fed as is) takes the same low-memory path."""
    model, tok = tiny_model("llama"), tiny_tokenizer("llama")
    gen = torch.Generator().manual_seed(5)
    windows = torch.randint(0, model.config.vocab_size, (3, 96), generator=gen)
    exact = make_lm(model, tok, 2, max_length=96)
    chunked = make_lm(model, tok, 2, max_length=96, memory_budget=_head_budget(model, 20))
    want, got = exact.score_windows(windows), chunked.score_windows(windows)
    assert chunked.modes_used == {"head"} and exact.modes_used == {"full"}
    assert got == pytest.approx(want, rel=1e-5)
    assert exact.forward_tokens == chunked.forward_tokens == 3 * 96


def _softcapped():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tok = tiny_tokenizer("gpt2")
    config = Gemma2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        final_logit_softcapping=30.0, max_position_embeddings=512,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Gemma2ForCausalLM(config).eval(), tok


def test_a_forward_that_does_more_than_the_head_is_refused() -> None:
    """Soft-capped logits (Gemma 2) are not head(body(x)): the chunked path is refused before
    scoring; with enough memory the model scores on the exact path."""
    model, tok = _softcapped()
    with pytest.raises(ChunkedHeadError, match="soft-capping"):
        make_lm(model, tok, BATCH, max_length=MAX_LENGTH, memory_budget=_head_budget(model, 8))
    lm = make_lm(model, tok, BATCH, max_length=MAX_LENGTH)
    reqs = _requests(model.config.vocab_size)
    assert all(isinstance(ll, float) for ll, _ in lm._loglikelihood_tokens(reqs))
    assert lm.modes_used == {"full"}


class _Forwards:
    """Counts the forward passes of a model."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.n = 0
        model.register_forward_pre_hook(self._count)

    def _count(self, *_: object) -> None:
        self.n += 1


def test_a_batch_that_cannot_fit_is_refused_before_scoring() -> None:
    """Too little memory even for one row of the output head: an error with the numbers (GB)
    and the settings to change, before any forward pass."""
    model, tok = tiny_model("gpt_neox"), tiny_tokenizer("gpt_neox")
    calls = _Forwards(model)
    one_row = _head_budget(model, 1) - activation_bytes(model, BATCH, MAX_LENGTH + 1)
    with pytest.raises(ScoringMemoryError) as err:
        make_lm(model, tok, BATCH, max_length=MAX_LENGTH, memory_budget=one_row // 2)
    assert "GB" in str(err.value) and "more memory" in str(err.value)
    assert "eval.max_length" not in str(err.value)  # no context length would fit
    # 40 tokens per row would fit: the message names eval.max_length and that length
    short = activation_bytes(model, BATCH, 40) + one_row
    with pytest.raises(ScoringMemoryError, match=r"lower eval.max_length to 40 tokens or less"):
        make_lm(model, tok, BATCH, max_length=MAX_LENGTH, memory_budget=short)
    # one row of full length fits, four do not: the message names the batch size that fits
    budget = activation_bytes(model, 1, MAX_LENGTH) + one_row + 1000
    with pytest.raises(ScoringMemoryError, match="lower the batch size to 1 or less"):
        make_lm(model, tok, BATCH, max_length=MAX_LENGTH, memory_budget=budget)
    assert calls.n == 0
    lm = make_lm(model, tok, 1, max_length=MAX_LENGTH, memory_budget=budget)
    assert calls.n == 1  # the head check, on 16 tokens
    # windows longer than the context the LM was checked for: refused before the first pass
    with pytest.raises(ScoringMemoryError, match="the window length"):
        lm.score_windows(torch.zeros(2, 4 * MAX_LENGTH, dtype=torch.long))
    assert calls.n == 1 and lm.forward_tokens == 0


def test_a_large_vocabulary_window_takes_the_head_mode() -> None:
    """262,144 logits over a 32,768-token window (34 GB in float32) with 24 GB: the output head
    per block; with 50 GB the full logits and blocked log-softmax; with 80 GB the exact path.
    Nothing of that size is allocated (only the head check's 16 tokens run)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=262144, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32768,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
    tok = tiny_tokenizer("llama")
    gb = 10**9
    modes = {}
    for total in (24, 50, 80):
        lm = make_lm(model, tok, 1, max_length=32768, memory_budget=total * gb - model_bytes(model))
        modes[total] = lm.check_memory(1, 32768, softmax_dtype=torch.float32)
    assert modes[24].kind == "head" and modes[24].block_rows >= 1
    assert modes[24].need_bytes <= 24 * gb - model_bytes(model)
    assert modes[50].kind == "blocked" and modes[80].kind == "full"


def test_memory_helpers_count_weights_once() -> None:
    """Tied weights count once; usable memory is the total less headroom and weights."""
    model = tiny_model("llama")  # tied input and output embeddings
    naive = sum(p.numel() * 4 for _, p in model.named_parameters(remove_duplicate=False))
    unique = sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()])
    assert model_bytes(model) == unique < naive
    from kbit.evaluation.batch_size import MEMORY_HEADROOM, memory_total_bytes

    total = memory_total_bytes("cpu")
    assert usable_memory_bytes(model, "cpu") == int((1 - MEMORY_HEADROOM) * total) - unique
    assert logit_row_bytes(10, 2, 4, copy=True) == 10 * (2 + 4 + 4)
    assert logit_row_bytes(10, 4, 4, copy=False) == 40
