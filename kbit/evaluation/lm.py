"""lm-eval's ``HFLM`` over an in-memory model, with the bookkeeping the workflow needs.

:class:`ScoringLM` scores exactly as lm-eval's own ``HFLM`` does (its ``_model_call`` and
``_loglikelihood_tokens`` run unchanged) and adds only what leaves the numbers alone:

- tokenization is memoised (``tok_encode`` and ``_encode_pair``), so evaluating the same task for
  many quantization configs of one model tokenizes each string once; :meth:`ScoringLM.pretokenize`
  fills the memo for a whole task up front, in batches;
- per request, the context and continuation token counts (the per-document ``n_tokens`` column),
  and the tokens fed through the model (for FLOP counts);
- the forward passes are timed (CUDA events, no host sync) and report to a
  :class:`~kbit.evaluation.progress.Progress`.

This is the plain path (``eval.fast_scoring: false``). The fast path,
:class:`kbit.evaluation.speed.scoring.FastLM`, replaces the scoring loop by one that gives the same
bits without HFLM's per-request host syncs; :func:`make_lm` picks one of the two. Both are
checked against lm-eval's command line by the fidelity tests.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Hashable, Iterator
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM

from kbit.evaluation.progress import Progress

#: log-softmax dtypes: "auto" is HFLM's default (the model's dtype)
SOFTMAX_DTYPES = ("float32", "auto")
#: HFLM's warning for an in-memory model, which is how every job here builds it (one process
#: per job): said once per model in every evaluation log, it tells the reader nothing
_IN_MEMORY_WARNING = "Passed an already-initialized model through `pretrained`"


class _DropInMemoryWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_IN_MEMORY_WARNING)


logging.getLogger(HFLM.__module__).addFilter(_DropInMemoryWarning())


class ScoringLM(HFLM):
    """``HFLM`` over an in-memory model that caches tokenization, counts tokens and times passes.

    Construct it like ``HFLM(pretrained=model, tokenizer=tok, batch_size=N)``; the model's
    weights may be changed in place between evaluations (quantization configs): the cached
    tokenization stays valid because it depends on the tokenizer only.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pair_cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        self._tok_cache: dict[tuple[str, bool | None], list[int]] = {}
        #: (context, continuation) or ("", text) for rolling -> (context tokens, scored tokens)
        self.request_tokens: dict[tuple[str, str], tuple[int, int]] = {}
        #: tokens fed through the model (unpadded inputs of the forward rows), since reset
        self.forward_tokens = 0
        self._forward_s = 0.0
        self._forward_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        #: forward passes are timed and reported to ``progress`` only while this is set
        self.timing = True
        self.progress: Progress | None = None

    # ------------------------------------------------------------------ counters
    @property
    def forward_time_s(self) -> float:
        """Seconds spent in the model's forward passes since reset (waits for pending ones)."""
        for start, end in self._forward_events:
            end.synchronize()
            self._forward_s += start.elapsed_time(end) / 1000.0
        self._forward_events.clear()
        return self._forward_s

    @forward_time_s.setter
    def forward_time_s(self, value: float) -> None:
        self._forward_events.clear()
        self._forward_s = float(value)

    def reset_counters(self) -> None:
        """Zero the forward token and time counters (call at the start of each task)."""
        self.forward_tokens = 0
        self.forward_time_s = 0.0

    # ------------------------------------------------------------------ tokenization reuse
    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        if left_truncate_len or kwargs:
            return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)
        key = (string, add_special_tokens)
        hit = self._tok_cache.get(key)
        if hit is None:
            hit = super().tok_encode(string, add_special_tokens)
            self._tok_cache[key] = hit
        # lm-eval only reads the lists; hand out copies anyway so no caller can corrupt the cache
        return list(hit)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        key = (context, continuation)
        hit = self._pair_cache.get(key)
        if hit is None:
            hit = super()._encode_pair(context, continuation)
            self._pair_cache[key] = hit
        return list(hit[0]), list(hit[1])

    def pretokenize(self, requests: list) -> None:
        """Fill the tokenization memo for lm-eval ``Instance``s (fast tokenizers: in batches).

        Only strings that ``tok_encode`` would encode with the tokenizer's default special-token
        handling are batched (``tokenizer(list)`` and ``tokenizer.encode(str)`` run the same
        encoder); everything else is left to the memoised per-string path.
        """
        strings: set[str] = set()
        for req in requests:
            if req.request_type == "loglikelihood_rolling":
                strings.add(req.args[0])
            elif req.request_type == "loglikelihood" and req.args[0] != "":
                context, continuation = req.args
                n_spaces = len(context) - len(context.rstrip())
                if n_spaces > 0:
                    continuation = context[-n_spaces:] + continuation
                    context = context[:-n_spaces]
                strings.update((context + continuation, context))
        todo = [s for s in strings if (s, None) not in self._tok_cache]
        batchable = getattr(self.tokenizer, "is_fast", False) and self.add_bos_token is None
        if todo and batchable:
            bos = self.tokenizer.decode(self.prefix_token_id)
            plain = [s for s in todo if not (bos and s.startswith(bos))]
            for i in range(0, len(plain), 4096):
                part = plain[i : i + 4096]
                ids = self.tokenizer(part, add_special_tokens=True)["input_ids"]
                self._tok_cache.update(((s, None), list(t)) for s, t in zip(part, ids, strict=True))
        for req in requests:  # the rest (and the pairs) through lm-eval's own code
            if req.request_type == "loglikelihood_rolling":
                self.tok_encode(req.args[0])
            elif req.request_type == "loglikelihood":
                context, continuation = req.args
                if context == "":
                    self.tok_encode(continuation, add_special_tokens=False)
                else:
                    self._encode_pair(context, continuation)

    # ------------------------------------------------------------------ scoring
    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=True)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        for req in requests:
            (text,) = req.args
            self.request_tokens[("", text)] = (0, len(self.tok_encode(text)))
        return super().loglikelihood_rolling(requests, disable_tqdm=True)

    @contextlib.contextmanager
    def reuse_plans(self, scope: Hashable) -> Iterator[None]:
        """Scoring of one fixed request set that is scored again for other weights happens inside
        this block. The plain path plans every call anew; the fast path caches its plans here."""
        yield

    def clear_plans(self) -> None:
        """Drop cached batch plans (the plain path keeps none)."""

    def _record_requests(self, requests: list) -> None:
        for key, ctx, cont in requests:
            if key is not None:
                self.request_tokens[tuple(key)] = (len(ctx), len(cont))

    def _loglikelihood_tokens(
        self,
        requests: list,
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        self._record_requests(requests)
        n_rows, n_tokens = self._forward_rows(requests)
        self.forward_tokens += n_tokens
        if self.progress is not None:
            self.progress.add_rows(n_rows)
        return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)

    def _forward_rows(self, requests: list) -> tuple[int, int]:
        """Forward rows lm-eval runs for ``requests`` and the unpadded tokens fed through them.

        One row per group of requests sharing context + continuation[:-1] (``logits_cache``).
        """
        if self.backend == "causal" and self.logits_cache:
            rows = {tuple(ctx + cont[:-1]) for _, ctx, cont in requests}
            lengths = [len(r) for r in rows]
        else:
            lengths = [len(ctx) + len(cont) - 1 for _, ctx, cont in requests]
        return len(lengths), sum(min(n, self.max_length) for n in lengths)

    # ------------------------------------------------------------------ forward passes
    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        with self._timed(int(inps.shape[0])):
            return self._forward(inps, attn_mask, labels)

    def _forward(self, inps: torch.Tensor, attn_mask: Any, labels: Any) -> torch.Tensor:
        """The model call itself: HFLM's own here (the fast path drops the unused KV cache)."""
        return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    @contextlib.contextmanager
    def _timed(self, rows: int) -> Iterator[None]:
        """Time the forward pass inside (CUDA events, no sync; the host clock on the CPU) and
        report its ``rows`` to the progress log; nothing while ``timing`` is off."""
        if not self.timing:
            yield
            return
        if self.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._forward_events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._forward_s += time.perf_counter() - t0
        if self.progress is not None:
            self.progress.tick(rows)


def make_lm(
    model: torch.nn.Module,
    tokenizer: Any,
    batch_size: int,
    softmax_dtype: str = "auto",
    *,
    max_length: int | None = None,
    fast: bool = True,
    **options: Any,
) -> ScoringLM:
    """lm-eval's HFLM around an in-memory model, with HFLM's defaults everywhere else.

    ``softmax_dtype`` is HFLM's (``float32`` or ``auto``, the model's dtype: what the command
    line does unless ``softmax_dtype=float32`` is in its ``--model_args``); ``max_length`` is
    HFLM's ``max_length`` model argument (None: HFLM's own choice from the model config).
    ``fast`` picks the fast scoring path (:mod:`kbit.evaluation.speed`), which takes
    ``options`` (``kv_cache``, ``cuda_graphs``); the plain path takes none.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be a positive integer (no 'auto')")
    if softmax_dtype not in SOFTMAX_DTYPES:
        raise ValueError(f"softmax_dtype={softmax_dtype!r}: allowed are {list(SOFTMAX_DTYPES)}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length={max_length!r}: must be an integer >= 2 or None")
    kwargs: dict[str, Any] = {
        "pretrained": model,
        "tokenizer": tokenizer,
        "batch_size": batch_size,
        "softmax_dtype": None if softmax_dtype == "auto" else softmax_dtype,
    }
    if max_length is not None:
        kwargs["max_length"] = max_length
    if fast:
        from kbit.evaluation.speed.scoring import FastLM

        return FastLM(**kwargs, **options)
    if options:
        raise ValueError(f"options {sorted(options)} apply to the fast scoring path only")
    return ScoringLM(**kwargs)
