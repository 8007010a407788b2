"""Batch-size search, reuse of tokenized requests, and lm-eval's scoring without its host syncs.

``ReusingHFLM`` is lm-eval's ``HFLM`` with additions that leave its numerics untouched:

- tokenization is memoised (``tok_encode`` and ``_encode_pair``), so evaluating the same task for
  many quantization configs of one model tokenizes each string once; :meth:`ReusingHFLM.pretokenize`
  fills the memo for a whole task up front, in batches;
- ``_loglikelihood_tokens`` is a faster re-implementation of HFLM's (see below) that gives the
  same numbers bit for bit;
- it records, per request, the context and continuation token counts (the per-document
  ``n_tokens`` column) and the tokens actually fed through the model (for FLOP counts);
- it times the forward passes (CUDA events, no host sync; the rest of the wall time is scoring
  bookkeeping);
- every batched forward pass reports to a :class:`~kbit.evaluation.progress.Progress`.

Fast scoring (``fast_scoring=True``, the default). HFLM's loop takes a log-softmax over the whole
padded ``[batch, length, vocab]`` logits, then for every request selects its continuation rows,
copies the continuation tokens to the device, and reads the sum and the greedy flag back to the
host (two syncs per request). The re-implementation keeps everything that decides the bits:

- the same batches: lm-eval's own ``Collator`` (length-descending sort, grouping of requests
  that share ``context + continuation[:-1]``, fixed batch size) and right padding with zeros, so
  every forward pass has exactly the input and shape HFLM gives it;
- the same forward call (HFLM's ``_model_call``) and the full logits it returns;
- the log-softmax in the same dtype (``softmax_dtype``, default the model's) over full vocabulary
  rows; it is taken only on the rows that are scored (gathered from the logits), which gives the
  same values because the softmax kernels reduce each row on its own;
- lm-eval's exact per-request arithmetic: greedy flags from the argmax of those log-softmax rows
  (the first maximum, as ``argmax`` on the full tensor) compared on the continuation's *last*
  positions, log-likelihoods gathered from its *first* positions (what ``torch.gather`` does for
  cached requests with shorter continuations), and each sum taken by ``torch.sum`` on its own
  ``[1, n]`` tensor of the same dtype, starting at an aligned address as a fresh tensor would.

What changes: batched index building on the host, one pinned asynchronous copy of all indices
per batch, device-side gathers for all requests of a batch, and one transfer of all results at
the end of each call (no host sync per request or per batch). Inside
:meth:`ReusingHFLM.reuse_plans` (one prepared task scored for many weight configs) the batch
plans, with their index arrays already on the device, are built once and reused, since they
depend on the requests and the batch size only. Memory is the logits plus a bounded
chunk of scored rows, less than HFLM's full log-softmax copy.

``positions_only=True`` (off by default, not exact) goes further and feeds only the scored
positions' hidden states through the LM head; the LM head's matrix product then has another
shape, which can change the last bits of the logits.

``find_batch_size`` picks the largest batch that fits a full-length forward pass plus the
log-softmax lm-eval's own HFLM (the command line) takes over it on CUDA, with some memory left
free, so that ``lm_eval --batch_size N`` can reproduce every number; or a configured default on
the CPU, where memory is rarely the limit and larger batches only add padding.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM

from kbit.evaluation.nosync import consecutive_positions
from kbit.evaluation.progress import Progress

log = logging.getLogger("kbit.evaluation")

#: batch size used on the CPU (and whenever no search is possible)
DEFAULT_CPU_BATCH_SIZE = 8
#: fraction of the host memory the logits of one CPU batch (and their log-softmax) may take
CPU_MEMORY_FRACTION = 0.4
#: upper end of the batch-size search on CUDA
MAX_BATCH_SIZE = 512
#: fraction of the device memory a batch-size candidate may leave unused at its peak
MEMORY_HEADROOM = 0.10
#: per-request log-likelihood segments start at multiples of this many elements (see module doc)
_ALIGN = 64
#: scored rows whose full-vocabulary log-softmax is materialised at once
_ROWS_PER_CHUNK = 8192


class _Slot:
    """Stands in for the logits ``Collator.get_cache`` expands for requests sharing one row."""

    def expand(self, *_: Any) -> _Slot:
        return self

    def chunk(self, n: int) -> list[_Slot]:
        return [self] * n


_SLOT = _Slot()


def _span(pos: list[int]) -> int | None:
    """The first index if ``pos`` is one run of consecutive integers, else None."""
    return pos[0] if pos and pos[-1] - pos[0] == len(pos) - 1 else None


def _collate(req: tuple) -> tuple:
    """HFLM's sort key: longest first, then by tokens."""
    toks = req[1] + req[2]
    return -len(toks), tuple(toks)


def _one_token_group(req: tuple) -> list[int]:
    """HFLM's grouping key: requests with the same context + continuation[:-1] share a row."""
    return req[-2] + req[-1][:-1]


def _signature(requests: list) -> list[tuple[Any, int, int]]:
    """What a cached plan must match: each request's key and token counts, in order."""
    return [(key, len(ctx), len(cont)) for key, ctx, cont in requests]


@dataclass(eq=False)
class _Batch:
    """One forward batch on the device: input tokens and, per chunk of scored rows, the
    indices (pos, gidx, gtok, eidx, etok, eseg) of ``ReusingHFLM._plan_batch``."""

    tokens: torch.Tensor
    chunks: list[tuple[torch.Tensor, ...]]
    spans: list[int | None]
    seg_off: list[int]
    seg_len: list[int]
    #: the batch's forward pass and scoring captured as a CUDA graph, its outputs, and the
    #: addresses of the weights it was captured with (see ReusingHFLM.cuda_graphs)
    graph: Any = None
    graph_out: tuple[torch.Tensor, torch.Tensor] | None = None
    graph_weights: tuple[int, ...] | None = None

    def release_graph(self) -> None:
        """Forget the captured graph (it is captured again when next needed)."""
        self.graph, self.graph_out, self.graph_weights = None, None, None


@dataclass(eq=False)
class _Plan:
    """All batches of one request list, the results' original order, and their cache keys."""

    signature: list[tuple[Any, int, int]]
    batches: list[_Batch] = field(default_factory=list)
    keys: list[Any] = field(default_factory=list)
    order: list[int] = field(default_factory=list)
    n_rows: int = 0
    n_tokens: int = 0


class ReusingHFLM(HFLM):
    """``HFLM`` over an in-memory model that caches tokenization, counts tokens, scores fast.

    Construct it like ``HFLM(pretrained=model, tokenizer=tok, batch_size=N)``; the model's
    weights may be changed in place between evaluations (quantization configs), the cached
    tokenization stays valid because it depends on the tokenizer only. ``fast_scoring=False``
    runs HFLM's own ``_loglikelihood_tokens``; ``positions_only=True`` is the inexact LM-head
    shortcut described in the module docstring.

    ``cuda_graphs=True`` (CUDA only, inside :meth:`reuse_plans`): each planned batch's forward
    pass and scoring are captured once as a CUDA graph and replayed for every later weight
    config, instead of issuing its few hundred kernels from Python again. Short requests (PIQA,
    Winogrande, HellaSwag) leave an H100 waiting for the host much of the time with a
    1.4B-parameter model, and a 160M one almost always. Weights are changed in place between
    configs, which a graph sees; a batch is captured again if any parameter or buffer has moved
    (e.g. untied). Every capture is checked: the batch is first scored eagerly (those results
    are returned), then captured and replayed, and the two must agree in every bit, or graphs
    are turned off for good with one warning. So graphs never change a result; they switch
    themselves off where capture would take another path (transformers 5.17, for one, builds
    an explicit attention mask under capture, whose attention kernel rounds differently; 5.23
    does not; a forward pass that syncs with the host cannot be captured at all). Position ids
    are known to be unpacked during capture as in eager passes (:mod:`kbit.evaluation.nosync`).
    With graphs, a batch's forward time also covers its scoring kernels.

    ``kv_cache=False`` (the default) runs causal forward passes with ``use_cache=False``. HFLM
    calls ``model(inps)``, which for most architectures builds a key/value cache nobody reads
    (scoring is one forward pass per batch): every layer copies its keys and values into it
    (``torch.cat`` onto an empty tensor) and all of them stay allocated until the pass ends.
    The attention sees the same keys and values either way, so the logits are the same bits;
    ``tests/test_runner.py`` checks that on every architecture (and on CUDA with
    ``-m gpu``). ``kv_cache=True`` calls the model exactly as HFLM does.
    """

    def __init__(
        self,
        *args: Any,
        fast_scoring: bool = True,
        positions_only: bool = False,
        kv_cache: bool = False,
        cuda_graphs: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.fast_scoring = fast_scoring
        self.positions_only = positions_only
        self.kv_cache = kv_cache
        self.cuda_graphs = cuda_graphs
        self._graph_pool: Any = None
        self._graph_stream: torch.cuda.Stream | None = None
        self._capturing = False
        self._pair_cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
        self._tok_cache: dict[tuple[str, bool | None], list[int]] = {}
        #: (context, continuation) or ("", text) for rolling -> (context tokens, scored tokens)
        self.request_tokens: dict[tuple[str, str], tuple[int, int]] = {}
        #: tokens fed through the model (unpadded inputs of the forward rows), since reset
        self.forward_tokens = 0
        self._forward_s = 0.0
        self._forward_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._head_rows: torch.Tensor | None = None
        self._plans: dict[tuple, _Plan] = {}
        self._plan_scope: Hashable | None = None
        self._plan_calls = 0
        self._head_hook: Any = None
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

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=True)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        for req in requests:
            (text,) = req.args
            self.request_tokens[("", text)] = (0, len(self.tok_encode(text)))
        return super().loglikelihood_rolling(requests, disable_tqdm=True)

    # ------------------------------------------------------------------ scoring
    @contextlib.contextmanager
    def reuse_plans(self, scope: Hashable) -> Iterator[None]:
        """Within this block, batch plans are cached under ``scope`` and reused on later entries.

        Use it around scoring a fixed request set (one prepared task) that is scored again for
        other weights: the collation, batch layout and index arrays (already on the device) of
        the n-th ``_loglikelihood_tokens`` call inside the block are kept and reused by the n-th
        call of the next block with the same ``scope``. A cached plan is used only if the
        requests have the same keys and token counts, and it never depends on the weights.
        """
        self._plan_scope, self._plan_calls = scope, 0
        try:
            yield
        finally:
            self._plan_scope = None

    def clear_plans(self) -> None:
        """Drop every cached batch plan (and the device memory its index arrays hold)."""
        self._plans.clear()

    def _loglikelihood_tokens(
        self,
        requests: list,
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        for key, ctx, cont in requests:
            if key is not None:
                self.request_tokens[tuple(key)] = (len(ctx), len(cont))
        if self.fast_scoring and self.backend == "causal" and self.batch_size != "auto":
            return self._score_tokens(requests)
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

    def _score_tokens(self, requests: list) -> list[tuple[float, bool]]:
        """HFLM's ``_loglikelihood_tokens`` for causal models, same bits, no per-request syncs."""
        key, plan = self._cached_plan(requests)
        fresh = plan is None
        if plan is None:
            plan = _Plan(signature=_signature(requests))
            plan.n_rows, plan.n_tokens = self._forward_rows(requests)
            batches: Iterable[_Batch] = self._plan_batches(requests, plan)
        else:
            batches = plan.batches
        self.forward_tokens += plan.n_tokens
        if self.progress is not None:
            self.progress.add_rows(plan.n_rows)
        sums: list[torch.Tensor] = []
        greedy: list[torch.Tensor] = []
        graphs = self._graphs_usable()
        weights = self._weight_addresses() if graphs else None
        for batch in batches:
            if graphs and self.cuda_graphs:  # off after a failed capture or check
                s, g = self._replay(batch, weights)
            else:
                s, g = self._run_batch(batch)
            sums.append(s)
            greedy.append(g)
        if graphs and not self.cuda_graphs:  # turned off during this call
            self._drop_graphs(plan)
        if fresh and key is not None:  # complete now: later calls in this scope reuse it
            self._plans[key] = plan
        res: list[Any] = [None] * len(requests)
        if not sums:
            return res
        lls = torch.cat(sums).tolist()
        flags = torch.cat(greedy).tolist()
        for idx, key, ll, flag in zip(plan.order, plan.keys, lls, flags, strict=True):
            answer = (ll, flag)
            res[idx] = answer
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        if any(r is None for r in res):
            raise AssertionError("scoring left requests without a result")
        return res

    def _cached_plan(self, requests: list) -> tuple[tuple | None, _Plan | None]:
        """This call's plan key (None outside reuse_plans) and its cached plan, if it matches."""
        if self._plan_scope is None:
            return None, None
        key = (self._plan_scope, self._plan_calls, self.batch_size, self.max_length)
        self._plan_calls += 1
        plan = self._plans.get(key)
        if plan is not None and plan.signature != _signature(requests):
            log.debug("cached batch plan %s no longer matches its requests; replanning", key)
            del self._plans[key]
            plan = None
        return key, plan

    def _plan_batches(self, requests: list, plan: _Plan) -> Iterator[_Batch]:
        """lm-eval's batches of ``requests``, planned and copied to the device one at a time.

        Each batch is also appended to ``plan`` (with the request order and keys), so that a
        later call over the same requests can reuse it; planning is lazy so that the first
        forward pass starts as soon as its own indices are ready.
        """
        from lm_eval.models.utils import Collator

        re_ord = Collator(
            requests,
            sort_fn=_collate,
            group_by="contexts" if self.logits_cache else None,
            group_fn=_one_token_group,
        )
        for chunk in re_ord.get_batched(n=self.batch_size, batch_fn=None):
            host = self._plan_batch(chunk, re_ord)
            plan.keys.extend(host["keys"])
            batch = self._batch_on_device(host)
            plan.batches.append(batch)
            yield batch
        plan.order = list(re_ord._reorder_indices)
        if len(plan.order) != len(requests):
            raise AssertionError(f"{len(plan.order)} results planned for {len(requests)} requests")

    def _plan_batch(self, chunk: list, re_ord: Any) -> dict[str, Any]:
        """Host-side indices of one batch: inputs, scored rows, gathers, greedy checks."""
        max_len = self.max_length
        inps = []
        for _, ctx, cont in chunk:
            if not (len(ctx) > 0 and 0 < len(cont) <= max_len):
                raise AssertionError(f"bad request lengths: context {len(ctx)}, cont {len(cont)}")
            total = len(ctx) + len(cont)
            if total > max_len + 1:
                log.warning(
                    "Combined length of context (%d) and continuation (%d) exceeds the model's "
                    "maximum length (%d). Truncating %d tokens from the left.",
                    len(ctx), len(cont), max_len, total - max_len + 1,
                )  # fmt: skip
            inps.append((ctx + cont)[-(max_len + 1) :][:-1])
        width = max(len(x) for x in inps)
        tokens = np.zeros((len(chunk), width), dtype=np.int64)
        for i, x in enumerate(inps):
            tokens[i, : len(x)] = x
        # scored rows, split into chunks of whole requests; indices below are chunk-local
        chunks: list[dict[str, list[int]]] = []
        cur: dict[str, list[int]] = {}
        keys: list[Any] = []
        seg_off: list[int] = []
        seg_len: list[int] = []
        n_gather = 0
        for i, ((key, ctx, cont), inp) in enumerate(zip(chunk, inps, strict=True)):
            contlen = len(cont)
            if not cur or (cur["pos"] and len(cur["pos"]) + contlen > _ROWS_PER_CHUNK):
                cur = {"pos": [], "gidx": [], "gtok": [], "eidx": [], "etok": [], "eseg": []}
                chunks.append(cur)
            base = len(cur["pos"])
            start = i * width + len(inp) - contlen
            cur["pos"].extend(range(start, start + contlen))
            for r_key, r_cont, _ in re_ord.get_cache(
                req_str=key, cxt_toks=ctx, cont_toks=cont, logits=_SLOT
            ):
                c = len(r_cont)
                r = len(keys)
                keys.append(r_key)
                # log-likelihood: gather at the first c rows, in an aligned segment of its own
                seg_off.append(n_gather)
                seg_len.append(c)
                pad = -c % _ALIGN
                cur["gidx"].extend([*range(base, base + c), *([base] * pad)])
                cur["gtok"].extend([*r_cont, *([0] * pad)])
                n_gather += c + pad
                # greedy: argmax equals the continuation on the last c rows
                cur["eidx"].extend(range(base + contlen - c, base + contlen))
                cur["etok"].extend(r_cont)
                cur["eseg"].extend([r] * c)
        return {
            "tokens": tokens,
            "chunks": chunks,
            "keys": keys,
            "seg_off": seg_off,
            "seg_len": seg_len,
        }

    def _batch_on_device(self, host: dict[str, Any]) -> _Batch:
        """A planned batch with all its index arrays in one host-to-device copy."""
        names = ("pos", "gidx", "gtok", "eidx", "etok", "eseg")
        arrays = [host["tokens"]]
        for ch in host["chunks"]:
            arrays.extend(np.asarray(ch[k], dtype=np.int64) for k in names)
        dev = self._to_device(arrays)
        n = len(host["chunks"])
        return _Batch(
            tokens=dev[0],
            chunks=[tuple(dev[1 + 6 * j : 7 + 6 * j]) for j in range(n)],
            spans=[_span(ch["pos"]) for ch in host["chunks"]],
            seg_off=host["seg_off"],
            seg_len=host["seg_len"],
        )

    def _to_device(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """All index arrays in one (pinned, asynchronous on CUDA) host-to-device copy."""
        sizes = [a.size for a in arrays]
        host = torch.from_numpy(np.concatenate([a.ravel() for a in arrays]))
        if self.device.type == "cuda":
            dev = host.pin_memory().to(self.device, non_blocking=True)
        else:
            dev = host.to(self.device)
        out, at = [], 0
        for a, n in zip(arrays, sizes, strict=True):
            out.append(dev[at : at + n].view(a.shape))
            at += n
        return out

    def _run_batch(self, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward pass and scoring of one planned batch; results stay on the device."""
        if self.positions_only:  # the LM head sees only the scored rows, in chunk order
            self._head_rows = torch.cat([c[0] for c in batch.chunks])
            self._install_head_hook()
        try:
            logits = self._model_call(batch.tokens)
        finally:
            self._head_rows = None
        flat = logits.reshape(-1, logits.shape[-1])
        n_req = len(batch.seg_len)
        vals = []
        miss = torch.zeros(n_req, dtype=torch.int32, device=flat.device)
        done = 0
        for (pos, gidx, gtok, eidx, etok, eseg), span in zip(
            batch.chunks, batch.spans, strict=True
        ):
            if self.positions_only:
                rows = flat[done : done + pos.shape[0]]
                done += pos.shape[0]
            elif span is not None:  # consecutive rows (rolling windows): a view, no copy
                rows = flat.narrow(0, span, pos.shape[0])
            else:  # advanced indexing (index_select is far slower on the CPU for long rows)
                rows = flat[pos]
            lp = F.log_softmax(rows, dim=-1, dtype=self.softmax_dtype)
            vals.append(lp[gidx, gtok])
            miss.index_add_(0, eseg, (lp.argmax(dim=-1)[eidx] != etok).to(torch.int32))
            del lp, rows
        del logits, flat
        v = vals[0] if len(vals) == 1 else torch.cat(vals)
        # one torch.sum per request over its own aligned [1, n] tensor, as HFLM sums
        sums = torch.stack(
            [
                v.narrow(0, off, c).view(1, c).sum()
                for off, c in zip(batch.seg_off, batch.seg_len, strict=True)
            ]
        )
        return sums, miss == 0

    # ------------------------------------------------------------------ CUDA graphs
    def _graphs_usable(self) -> bool:
        """Graphs pay off only for plans that are kept and replayed (inside reuse_plans)."""
        return self.cuda_graphs and self.device.type == "cuda" and self._plan_scope is not None

    def _weight_addresses(self) -> tuple[int, ...]:
        """Where every parameter and buffer lives: a captured graph reads these addresses."""
        named = [
            *self.model.named_parameters(remove_duplicate=False),
            *self.model.named_buffers(remove_duplicate=False),
        ]
        return tuple(t.data_ptr() for _, t in named)

    def _replay(self, batch: _Batch, weights: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        """``_run_batch`` through the batch's CUDA graph, captured and checked first if needed.

        A batch without a graph for the current weights is scored eagerly (those are the
        results), then captured, replayed once and compared with them: any difference in any
        bit turns graphs off for good (one warning), so every result is the eager one's.
        """
        if batch.graph is not None and batch.graph_weights == weights:
            with self._timed(int(batch.tokens.shape[0])):
                batch.graph.replay()
            sums, ok = batch.graph_out
            return sums.clone(), ok.clone()
        batch.release_graph()
        eager = self._run_batch(batch)
        try:
            self._capture(batch)
            batch.graph.replay()
            same = all(torch.equal(a, b) for a, b in zip(eager, batch.graph_out, strict=True))
            reason = "its results differ from the eager pass in the last bits"
        except Exception as exc:  # any capture failure: score eagerly
            torch.cuda.synchronize(self.device)
            same, reason = False, f"capture failed: {exc}"
        if same:
            batch.graph_weights = weights
        else:
            self.cuda_graphs = False
            log.warning("CUDA graphs off (%s); scoring eagerly", reason)
        return eager

    def _drop_graphs(self, current: _Plan) -> None:
        """Release every captured graph (of the cached plans and of ``current``)."""
        for plan in [*self._plans.values(), current]:
            for b in plan.batches:
                b.release_graph()
        self._graph_pool, self._graph_stream = None, None

    def _capture(self, batch: _Batch) -> None:
        """Record the batch's ``_run_batch`` as a CUDA graph (its outputs: ``graph_out``)."""
        if self._graph_stream is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
            self._graph_stream = torch.cuda.Stream(self.device)
            # warm-up on the capture stream: lazily created handles and workspaces must exist
            # before capture (PyTorch's recipe); its results are discarded
            self._graph_stream.wait_stream(torch.cuda.current_stream(self.device))
            with self._untimed(), torch.cuda.stream(self._graph_stream):
                self._run_batch(batch)
            torch.cuda.current_stream(self.device).wait_stream(self._graph_stream)
        graph = torch.cuda.CUDAGraph()
        with (
            self._untimed(),
            torch.cuda.graph(graph, pool=self._graph_pool, stream=self._graph_stream),
        ):
            out = self._run_batch(batch)
        batch.graph, batch.graph_out = graph, out

    @contextlib.contextmanager
    def _untimed(self) -> Iterator[None]:
        """Forward passes inside are neither timed nor counted (graph warm-up and capture)."""
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = False

    def _install_head_hook(self) -> None:
        if self._head_hook is not None:
            return
        head = self.model.get_output_embeddings()

        def keep_rows(_module: Any, args: tuple) -> tuple | None:
            if self._head_rows is None:
                return None
            hidden = args[0]
            return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, self._head_rows),)

        self._head_hook = head.register_forward_pre_hook(keep_rows)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if self._capturing:  # timed and counted when the graph is replayed
            return self._forward(inps, attn_mask, labels)
        with self._timed(int(inps.shape[0])):
            return self._forward(inps, attn_mask, labels)

    @contextlib.contextmanager
    def _timed(self, rows: int) -> Iterator[None]:
        """Time the forward pass inside (CUDA events, no sync; the host clock on the CPU) and
        report its ``rows`` to the progress log."""
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

    def _forward(self, inps: torch.Tensor, attn_mask: Any, labels: Any) -> torch.Tensor:
        """HFLM's model call; for causal scoring without the unused key/value cache and without
        transformers' host sync on position ids (:mod:`kbit.evaluation.nosync`)."""
        if self.kv_cache or attn_mask is not None or labels is not None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        amp = self.mixed_precision_dtype
        with (
            torch.no_grad(),
            torch.autocast(device_type=self.device.type, dtype=amp, enabled=amp is not None),
            consecutive_positions(),
        ):
            return self.model(inps, use_cache=False).logits


def find_batch_size(
    model: torch.nn.Module,
    max_length: int,
    device: str | torch.device,
    default: int = DEFAULT_CPU_BATCH_SIZE,
    max_batch_size: int = MAX_BATCH_SIZE,
    headroom: float = MEMORY_HEADROOM,
    softmax_dtype: torch.dtype | None = None,
) -> int:
    """Largest batch of ``max_length`` tokens that lm-eval's own scoring fits on ``device``.

    On CUDA each candidate runs the model on a full ``[batch, max_length]`` input and the
    full-vocabulary log-softmax (in ``softmax_dtype``) HFLM applies to the logits (the command
    line's peak, which is above :class:`ReusingHFLM`'s); a candidate fits if it neither runs out
    of memory nor leaves less than ``headroom`` of the device memory unused at its peak. Powers
    of two are tried first, then the gap to the next one in quarter steps. On any other device
    see :func:`cpu_batch_size`.
    """
    device = torch.device(device)
    if max_length < 1:
        raise ValueError(f"max_length={max_length}: must be a positive number of tokens")
    vocab = int(model.get_output_embeddings().weight.shape[0])
    if device.type != "cuda":
        return cpu_batch_size(max_length, vocab, default)
    limit = (1.0 - headroom) * torch.cuda.get_device_properties(device).total_memory

    def fits(bs: int) -> bool:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            with torch.no_grad():
                inp = torch.randint(0, vocab, (bs, max_length), device=device)
                logits = model(inp).logits
                F.log_softmax(logits, dim=-1, dtype=softmax_dtype)
                del logits, inp
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_reserved(device)
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            torch.cuda.empty_cache()
        log.info("batch %d x %d tokens: peak %.1f GiB", bs, max_length, peak / 2**30)
        return peak <= limit

    best = search_batch_size(fits, max_batch_size)
    if best == 0:
        raise RuntimeError(
            f"a batch of 1 x {max_length} tokens does not fit on {device}; "
            "lower the model's max_length or use a larger device"
        )
    log.info("batch size %d fits %d tokens on %s", best, max_length, device)
    return best


def search_batch_size(fits: Callable[[int], bool], max_batch_size: int = MAX_BATCH_SIZE) -> int:
    """Largest batch size ``fits`` accepts (0 if not even 1), assuming larger ones fit less.

    Powers of two first (1, 2, 4, ... up to ``max_batch_size``), then, if memory (not the cap)
    stopped them, the gap to the next power in quarter steps: a few probes instead of a full
    bisection, each of which costs a full-length forward pass.
    """
    best = 0
    bs = 1
    while bs <= max_batch_size and fits(bs):
        best = bs
        bs *= 2
    step = best // 4
    if step > 0 and bs <= max_batch_size:  # stopped by memory, not by max_batch_size
        for cand in (best + step, best + 2 * step, best + 3 * step):
            if not fits(cand):
                break
            best = cand
    return best


def host_memory_bytes() -> int:
    """Physical memory of this machine (the cgroup limit where one is set and lower)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        cap = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if cap.isdigit():
            total = min(total, int(cap))
    except OSError:
        pass
    return total


def cpu_batch_size(
    max_length: int,
    vocab: int,
    default: int = DEFAULT_CPU_BATCH_SIZE,
    memory_bytes: int | None = None,
) -> int:
    """``default``, lowered so that a full-length batch's float32 logits and the log-softmax
    HFLM takes over them stay within :data:`CPU_MEMORY_FRACTION` of the host memory.

    Why: long-context models make this the limit on the CPU: 8 rolling windows of 8192 tokens
    over a 49k vocabulary (SmolLM2) are 13 GB of logits, 26 GB with their log-softmax.
    """
    if memory_bytes is None:
        memory_bytes = host_memory_bytes()
    per_row = 2 * max_length * vocab * 4
    fits = int(CPU_MEMORY_FRACTION * memory_bytes // per_row)
    bs = max(1, min(int(default), fits))
    if bs < default:
        log.info(
            "batch size %d on the CPU: %d x %d-token rows of %d logits fit in %.0f%% of %.1f GiB",
            bs, bs, max_length, vocab, 100 * CPU_MEMORY_FRACTION, memory_bytes / 2**30,
        )  # fmt: skip
    return bs


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
