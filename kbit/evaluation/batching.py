"""Batch-size search and reuse of tokenized requests across quantization configs of one model.

``ReusingHFLM`` is lm-eval's ``HFLM`` with three additions that leave its numerics untouched
(it calls the parent's ``_loglikelihood_tokens`` for every score):

- ``_encode_pair`` is memoised, so evaluating the same task for many quantization configs of one
  model tokenizes each (context, continuation) pair once;
- it records, per request, the context and continuation token counts (the per-document
  ``n_tokens`` column) and the tokens actually fed through the model (for FLOP counts);
- it times the forward passes (the rest of the wall time is lm-eval's per-request bookkeeping);
- every batched forward pass reports to a :class:`~kbit.evaluation.progress.Progress`.

``find_batch_size`` picks the largest power-of-two batch that fits a full-length forward pass
plus the log-softmax lm-eval takes over it (CUDA), or a configured default on the CPU, where
memory is rarely the limit and larger batches only add padding.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM

from kbit.evaluation.progress import Progress

log = logging.getLogger("kbit.evaluation")

#: batch size used on the CPU (and whenever no search is possible)
DEFAULT_CPU_BATCH_SIZE = 8
#: upper end of the power-of-two search on CUDA
MAX_BATCH_SIZE = 512


class ReusingHFLM(HFLM):
    """``HFLM`` over an in-memory model that caches tokenization and counts tokens.

    Construct it exactly like ``HFLM(pretrained=model, tokenizer=tok, batch_size=N)``; the
    model's weights may be changed in place between evaluations (quantization configs), the
    cached tokenization stays valid because it depends on the tokenizer only.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pair_cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        #: (context, continuation) or ("", text) for rolling -> (context tokens, scored tokens)
        self.request_tokens: dict[tuple[str, str], tuple[int, int]] = {}
        #: tokens fed through the model (unpadded inputs of the forward rows), since reset
        self.forward_tokens = 0
        #: seconds spent in the model's forward passes, since reset (synchronised on CUDA)
        self.forward_time_s = 0.0
        self.progress: Progress | None = None

    def reset_counters(self) -> None:
        """Zero the forward token and time counters (call at the start of each task)."""
        self.forward_tokens = 0
        self.forward_time_s = 0.0

    # ------------------------------------------------------------------ tokenization reuse
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        key = (context, continuation)
        hit = self._pair_cache.get(key)
        if hit is None:
            hit = super()._encode_pair(context, continuation)
            self._pair_cache[key] = hit
        # lm-eval only reads the lists; hand out copies anyway so no caller can corrupt the cache
        return list(hit[0]), list(hit[1])

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=True)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        for req in requests:
            (text,) = req.args
            self.request_tokens[("", text)] = (0, len(self.tok_encode(text)))
        return super().loglikelihood_rolling(requests, disable_tqdm=True)

    # ------------------------------------------------------------------ counting
    def _loglikelihood_tokens(
        self,
        requests: list,
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        for key, ctx, cont in requests:
            if key is not None:
                self.request_tokens[tuple(key)] = (len(ctx), len(cont))
        # lm-eval runs one forward row per group of requests sharing context + cont[:-1]
        if self.backend == "causal" and self.logits_cache:
            rows = {tuple(ctx + cont[:-1]) for _, ctx, cont in requests}
            lengths = [len(r) for r in rows]
        else:
            lengths = [len(ctx) + len(cont) - 1 for _, ctx, cont in requests]
        self.forward_tokens += sum(min(n, self.max_length) for n in lengths)
        if self.progress is not None:
            self.progress.add_rows(len(lengths))
        return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        out = super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        if cuda:
            torch.cuda.synchronize(self.device)
        self.forward_time_s += time.perf_counter() - t0
        if self.progress is not None:
            self.progress.tick(int(inps.shape[0]))
        return out


def find_batch_size(
    model: torch.nn.Module,
    max_length: int,
    device: str | torch.device,
    default: int = DEFAULT_CPU_BATCH_SIZE,
    max_batch_size: int = MAX_BATCH_SIZE,
) -> int:
    """Largest power-of-two batch of ``max_length`` tokens that survives a forward pass.

    On CUDA each candidate runs the model on a full ``[batch, max_length]`` input and the
    log-softmax lm-eval applies to the logits; the first out-of-memory error stops the search.
    On any other device ``default`` is returned unchanged.
    """
    device = torch.device(device)
    if max_length < 1:
        raise ValueError(f"max_length={max_length}: must be a positive number of tokens")
    if device.type != "cuda":
        return int(default)
    vocab = int(model.get_output_embeddings().weight.shape[0])
    best = 0
    bs = 1
    while bs <= max_batch_size:
        try:
            with torch.no_grad():
                inp = torch.randint(0, vocab, (bs, max_length), device=device)
                logits = model(inp).logits
                F.log_softmax(logits, dim=-1)
                del logits, inp
            torch.cuda.synchronize(device)
            best = bs
            bs *= 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    if best == 0:
        raise RuntimeError(
            f"a batch of 1 x {max_length} tokens does not fit on {device}; "
            "lower the model's max_length or use a larger device"
        )
    log.info("batch size %d fits %d tokens on %s", best, max_length, device)
    return best


def write_batch_size(path: str | os.PathLike, info: dict[str, Any]) -> None:
    """Write the batch-size JSON the evaluation jobs read (atomically)."""
    if int(info.get("batch_size", 0)) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {info.get('batch_size')!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(info, fh, indent=2, sort_keys=True)
    os.replace(tmp, path)


def read_batch_size(path: str | os.PathLike | None, default: int = DEFAULT_CPU_BATCH_SIZE) -> int:
    """The batch size stored by :func:`write_batch_size` (``default`` when ``path`` is None)."""
    if path is None:
        return int(default)
    with open(path) as fh:
        info = json.load(fh)
    bs = info.get("batch_size")
    if not isinstance(bs, int) or bs < 1:
        raise ValueError(f"{path}: 'batch_size' must be a positive integer, got {bs!r}")
    return bs
