"""Fast scoring: lm-eval's log-likelihoods with the same bits, without its host syncs.

HFLM's loop takes a log-softmax over the whole padded ``[batch, length, vocab]`` logits, then for
every request selects its continuation rows, copies the continuation tokens to the device, and
reads the sum and the greedy flag back to the host (two syncs per request). :class:`FastLM`
re-implements it and keeps everything that decides the bits:

- the same batches: lm-eval's own ``Collator`` (length-descending sort, grouping of requests
  that share ``context + continuation[:-1]``, fixed batch size) and right padding with zeros, so
  every forward pass has exactly the input and shape HFLM gives it;
- the same forward call and the full logits it returns (without the key/value cache HFLM's
  ``model(inps)`` builds and never reads: same logits, checked on every architecture);
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
the end of each call (no host sync per request or per batch). Inside :meth:`FastLM.reuse_plans`
(one prepared task scored for many weight configs) the batch plans, with their index arrays
already on the device, are built once and reused, since they depend on the requests and the batch
size only; with ``cuda_graphs`` their forward passes are also replayed as CUDA graphs
(:mod:`kbit.evaluation.speed.graphs`). Memory is the logits plus a bounded chunk of scored rows,
less than HFLM's full log-softmax copy.

When even that does not fit (a 262,144-token vocabulary over a 32,768-token window is 34 GB of
float32 logits for one row), a batch is scored in one of two low-memory modes (:class:`Mode`),
chosen per batch from its shape and the memory of the device (host memory on the CPU), never
from what happens to be free, so that a given model, batch size and machine always take the same
path:

- ``blocked``: the full logits fit but not the log-softmax of a chunk of scored rows: the
  log-softmax is taken over blocks of rows. Same bits (each row is reduced on its own).
- ``head``: the full logits do not fit: the model's body runs once and its output head
  (``get_output_embeddings()``) is applied to blocks of scored rows' hidden states. The head's
  matrix product then has another shape, which can change the last bits: log-likelihoods equal
  the exact path's to float32 rounding (``tests/test_chunked.py``). It is used only for batches
  whose logits do not fit, and only for a model whose ``head(body(x))`` reproduces its own logits
  bit for bit on a short input (checked on first use; logit scaling or soft-capping in the
  forward pass makes it refuse with :class:`ChunkedHeadError`).

A batch that does not fit even so (weights, activations and one row of logits) is refused before
any scoring starts (:class:`ScoringMemoryError`, naming the setting to change, with the numbers).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kbit.evaluation.batch_size import (
    activation_bytes,
    gigabytes,
    logit_row_bytes,
    memory_total_bytes,
    model_bytes,
    usable_memory_bytes,
)
from kbit.evaluation.lm import ScoringLM
from kbit.evaluation.speed.graphs import CudaGraphs
from kbit.evaluation.speed.nosync import consecutive_positions

log = logging.getLogger("kbit.evaluation")

#: per-request log-likelihood segments start at multiples of this many elements (see module doc)
_ALIGN = 64
#: scored rows whose full-vocabulary log-softmax is materialised at once
_ROWS_PER_CHUNK = 8192
#: fewest rows per log-softmax block worth taking over the full logits; with less room left
#: the output head is applied per block instead
_MIN_BLOCK_ROWS = 32
#: tokens of the short input on which head(body(x)) is checked against the model's logits
_HEAD_CHECK_TOKENS = 16


class ScoringMemoryError(MemoryError):
    """A batch cannot be scored in the memory of its device; the message says what to change."""


class ChunkedHeadError(RuntimeError):
    """The model's logits are not its output head applied to its body's last hidden states."""


@dataclass(frozen=True)
class Mode:
    """How one batch's logits are scored (see the module doc): ``full`` (the exact path),
    ``blocked`` or ``head`` with ``block_rows`` rows per log-softmax block; ``need_bytes`` is
    the planned memory of activations, logits and scoring (weights excluded)."""

    kind: str = "full"
    block_rows: int = 0
    need_bytes: int = 0


FULL = Mode()


class _Slot:
    """Stands in for the logits ``Collator.get_cache`` expands for requests sharing one row."""

    def expand(self, *_: Any) -> _Slot:
        return self

    def chunk(self, n: int) -> list[_Slot]:
        return [self] * n


_SLOT = _Slot()


def _span(pos: Any) -> int | None:
    """The first index if ``pos`` is one run of consecutive integers, else None."""
    return int(pos[0]) if len(pos) and pos[-1] - pos[0] == len(pos) - 1 else None


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
class Batch:
    """One forward batch on the device: input tokens and, per chunk of scored rows, the
    indices (pos, gidx, gtok, eidx, etok, eseg) of ``FastLM._plan_batch``."""

    tokens: torch.Tensor
    chunks: list[tuple[torch.Tensor, ...]]
    spans: list[int | None]
    seg_off: list[int]
    seg_len: list[int]
    #: the batch's forward pass and scoring captured as a CUDA graph, its outputs, and the
    #: addresses of the weights it was captured with (see :mod:`kbit.evaluation.speed.graphs`)
    graph: Any = None
    graph_out: tuple[torch.Tensor, torch.Tensor] | None = None
    graph_weights: tuple[int, ...] | None = None
    #: how its logits are scored (decided from its shape and the device's memory)
    mode: Mode = FULL
    #: the log-softmax dtype (None: the logits' own, HFLM's default)
    softmax_dtype: torch.dtype | None = None

    def release_graph(self) -> None:
        """Forget the captured graph (it is captured again when next needed)."""
        self.graph, self.graph_out, self.graph_weights = None, None, None


@dataclass(eq=False)
class Plan:
    """All batches of one request list, the results' original order, and their cache keys."""

    signature: list[tuple[Any, int, int]]
    batches: list[Batch] = field(default_factory=list)
    keys: list[Any] = field(default_factory=list)
    order: list[int] = field(default_factory=list)
    n_rows: int = 0
    n_tokens: int = 0


def _plan_windows(tokens: np.ndarray) -> dict[str, Any]:
    """Host-side indices of a batch of windows fed as is: row i's positions 0..W-2 score its
    tokens 1..W-1, one chunk per row (consecutive rows: a view), no greedy checks."""
    n, width = tokens.shape
    c = width - 1
    pad = -c % _ALIGN
    none = np.zeros(0, dtype=np.int64)
    chunks = [
        {
            "pos": np.arange(i * width, i * width + c, dtype=np.int64),
            "gidx": np.concatenate([np.arange(c, dtype=np.int64), np.zeros(pad, np.int64)]),
            "gtok": np.concatenate([tokens[i, 1:], np.zeros(pad, np.int64)]),
            "eidx": none,
            "etok": none,
            "eseg": none,
        }
        for i in range(n)
    ]
    return {
        "tokens": np.ascontiguousarray(tokens, dtype=np.int64),
        "chunks": chunks,
        "keys": [None] * n,
        "seg_off": [i * (c + pad) for i in range(n)],
        "seg_len": [c] * n,
        "softmax_dtype": torch.float32,
    }


class FastLM(CudaGraphs, ScoringLM):
    """:class:`~kbit.evaluation.lm.ScoringLM` with the fast scoring loop (same bits as HFLM).

    ``kv_cache=False`` (the default) runs causal forward passes with ``use_cache=False``. HFLM
    calls ``model(inps)``, which for most architectures builds a key/value cache nobody reads
    (scoring is one forward pass per batch): every layer copies its keys and values into it
    (``torch.cat`` onto an empty tensor) and all of them stay allocated until the pass ends. The
    attention sees the same keys and values either way, so the logits are the same bits;
    ``tests/test_runner.py`` checks that on every architecture (and on CUDA with ``-m gpu``).
    ``kv_cache=True`` calls the model exactly as HFLM does. ``cuda_graphs``: see
    :class:`~kbit.evaluation.speed.graphs.CudaGraphs`.

    ``memory_budget``: bytes that activations, logits and their scoring may take (weights
    excluded); None: the device's memory less headroom and the weights
    (:func:`~kbit.evaluation.batch_size.usable_memory_bytes`). It picks each batch's
    :class:`Mode`; a batch of ``batch_size`` full-length rows that cannot be scored at all is
    refused here, before any scoring (:meth:`check_memory`).
    """

    def __init__(
        self,
        *args: Any,
        kv_cache: bool = False,
        cuda_graphs: bool = False,
        memory_budget: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.kv_cache = kv_cache
        self.cuda_graphs = cuda_graphs
        self._plans: dict[tuple, Plan] = {}
        self._plan_scope: Hashable | None = None
        self._plan_calls = 0
        if memory_budget is not None and memory_budget < 0:
            raise ValueError(f"memory_budget={memory_budget}: must be a number of bytes >= 0")
        self.memory_budget = memory_budget
        self._usable: int | None = None
        #: (body, head) once head(body(x)) was checked to give the model's logits, and their dtype
        self._split: tuple[torch.nn.Module, torch.nn.Module] | None = None
        self._logits_dtype: torch.dtype | None = None
        #: memory modes (:class:`Mode` kinds) of the batches planned so far
        self.modes_used: set[str] = set()
        if self.backend == "causal" and isinstance(self.batch_size, int):
            self.check_memory(self.batch_size, self.max_length)

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
        if self.backend != "causal" or self.batch_size == "auto":
            return super()._loglikelihood_tokens(requests, disable_tqdm, override_bs)
        self._record_requests(requests)
        return self._score_tokens(requests)

    def _score_tokens(self, requests: list) -> list[tuple[float, bool]]:
        """HFLM's ``_loglikelihood_tokens`` for causal models, same bits, no per-request syncs."""
        key, plan = self._cached_plan(requests)
        fresh = plan is None
        if plan is None:
            plan = Plan(signature=_signature(requests))
            plan.n_rows, plan.n_tokens = self._forward_rows(requests)
            batches: Iterable[Batch] = self._plan_batches(requests, plan)
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

    def score_windows(self, windows: torch.Tensor) -> list[float]:
        """Log-likelihood of tokens 1..W-1 of each row of ``windows`` ``[n, W]``, each row fed
        to the model as is (perplexity over fixed windows, :mod:`kbit.evaluation.windows`).

        Batches of ``batch_size`` rows (all of one length: no padding), the log-softmax in
        float32 over full vocabulary rows, each row's sum by ``torch.sum`` over its own aligned
        ``[1, W-1]`` tensor as for a request, in the memory modes of requests; one float per row
        (the float32 sum's exact value). A batch that cannot be scored at all is refused before
        the first forward pass.
        """
        if windows.dim() != 2 or windows.shape[1] < 2:
            raise ValueError(f"windows must be [n, W] with W >= 2, got {tuple(windows.shape)}")
        n, width = (int(d) for d in windows.shape)
        step = int(self.batch_size)
        if n:
            self.check_memory(min(step, n), width, "the window length", torch.float32)
        host = windows.to("cpu", torch.int64).numpy()
        self.forward_tokens += n * width
        if self.progress is not None:
            self.progress.add_rows(n)
        sums = [
            self._run_batch(self._batch_on_device(_plan_windows(host[a : a + step])))[0]
            for a in range(0, n, step)
        ]
        return torch.cat(sums).tolist() if sums else []

    def _cached_plan(self, requests: list) -> tuple[tuple | None, Plan | None]:
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

    def _plan_batches(self, requests: list, plan: Plan) -> Iterator[Batch]:
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

    def _batch_on_device(self, host: dict[str, Any]) -> Batch:
        """A planned batch with all its index arrays in one host-to-device copy."""
        names = ("pos", "gidx", "gtok", "eidx", "etok", "eseg")
        arrays = [host["tokens"]]
        for ch in host["chunks"]:
            arrays.extend(np.asarray(ch[k], dtype=np.int64) for k in names)
        dev = self._to_device(arrays)
        n = len(host["chunks"])
        spans = [_span(ch["pos"]) for ch in host["chunks"]]
        softmax_dtype = host.get("softmax_dtype", self.softmax_dtype)
        rows = [(len(ch["pos"]), sp is None) for ch, sp in zip(host["chunks"], spans, strict=True)]
        mode = self._mode(*host["tokens"].shape, rows, softmax_dtype)
        if mode.kind == "head":
            self._body_and_head(dev[0])  # checked before the first pass that relies on it
        return Batch(
            tokens=dev[0],
            chunks=[tuple(dev[1 + 6 * j : 7 + 6 * j]) for j in range(n)],
            spans=spans,
            seg_off=host["seg_off"],
            seg_len=host["seg_len"],
            mode=mode,
            softmax_dtype=softmax_dtype,
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

    def _run_batch(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward pass and scoring of one planned batch; results stay on the device."""
        if batch.mode.kind != "full":
            return self._run_blocks(batch)
        logits = self._model_call(batch.tokens)
        flat = logits.reshape(-1, logits.shape[-1])
        n_req = len(batch.seg_len)
        vals = []
        miss = torch.zeros(n_req, dtype=torch.int32, device=flat.device)
        for (pos, gidx, gtok, eidx, etok, eseg), span in zip(
            batch.chunks, batch.spans, strict=True
        ):
            # consecutive rows (rolling windows): a view, no copy; else advanced indexing
            # (index_select is far slower on the CPU for long rows)
            rows = flat.narrow(0, span, pos.shape[0]) if span is not None else flat[pos]
            lp = F.log_softmax(rows, dim=-1, dtype=batch.softmax_dtype)
            vals.append(lp[gidx, gtok])
            if etok.shape[0]:  # windows (score_windows) check no greedy continuation
                miss.index_add_(0, eseg, (lp.argmax(dim=-1)[eidx] != etok).to(torch.int32))
            del lp, rows
        del logits, flat
        return self._segment_sums(vals, batch), miss == 0

    @staticmethod
    def _segment_sums(vals: list[torch.Tensor], batch: Batch) -> torch.Tensor:
        """One torch.sum per request over its own aligned [1, n] tensor, as HFLM sums."""
        v = vals[0] if len(vals) == 1 else torch.cat(vals)
        return torch.stack(
            [
                v.narrow(0, off, c).view(1, c).sum()
                for off, c in zip(batch.seg_off, batch.seg_len, strict=True)
            ]
        )

    # ------------------------------------------------------------------ low-memory scoring
    def _run_blocks(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """``_run_batch`` in a low-memory :class:`Mode`: log-softmax (and, in ``head`` mode, the
        output head) over blocks of scored rows; same indices, gathers and sums otherwise.

        In ``head`` mode the batch's time covers the body, the head and the scoring.
        """
        head_mode = batch.mode.kind == "head"
        n_rows = int(batch.tokens.shape[0])
        timer = self._timed(n_rows) if head_mode else contextlib.nullcontext()
        with timer:
            head = None
            if head_mode:
                body, head = self._body_and_head(batch.tokens)
                with self._forward_context():
                    flat = self._hidden_states(body, batch.tokens).flatten(0, 1)
            else:
                logits = self._model_call(batch.tokens)
                flat = logits.reshape(-1, logits.shape[-1])
                del logits
            miss = torch.zeros(len(batch.seg_len), dtype=torch.int32, device=flat.device)
            vals = []
            for (pos, gidx, gtok, eidx, etok, eseg), span in zip(
                batch.chunks, batch.spans, strict=True
            ):
                v, best = self._blocked_chunk(
                    flat, pos, span, gidx, gtok, bool(etok.shape[0]), batch, head
                )
                vals.append(v)
                if best is not None:
                    miss.index_add_(0, eseg, (best[eidx] != etok).to(torch.int32))
            del flat
            sums = self._segment_sums(vals, batch)
        return sums, miss == 0

    def _blocked_chunk(
        self,
        flat: torch.Tensor,
        pos: torch.Tensor,
        span: int | None,
        gidx: torch.Tensor,
        gtok: torch.Tensor,
        greedy: bool,
        batch: Batch,
        head: torch.nn.Module | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gathered log-probabilities of one chunk (and each row's argmax when ``greedy``),
        its rows taken ``block_rows`` at a time from ``flat`` (logits, or hidden states that
        ``head`` turns into logits). Every gather index is served by the block holding its row
        (``torch.where``, no host sync)."""
        n = int(pos.shape[0])
        step = batch.mode.block_rows
        vals: torch.Tensor | None = None
        best = torch.empty(n, dtype=torch.long, device=flat.device) if greedy else None
        for a in range(0, n, step):
            m = min(step, n - a)
            rows = flat.narrow(0, span + a, m) if span is not None else flat[pos[a : a + m]]
            if head is not None:
                with self._forward_context():
                    rows = head(rows).to(self._logits_dtype)
            lp = F.log_softmax(rows, dim=-1, dtype=batch.softmax_dtype)
            local = gidx - a
            inside = (local >= 0) & (local < m)
            picked = lp[local.clamp(0, m - 1), gtok]
            vals = torch.where(inside, picked, picked.new_zeros(()) if vals is None else vals)
            if best is not None:
                best[a : a + m] = lp.argmax(dim=-1)
            del lp, rows
        if vals is None:
            raise AssertionError("a chunk without scored rows")
        return vals, best

    def _forward_context(self) -> contextlib.ExitStack:
        """What every causal forward pass of the fast path runs under (see :meth:`_forward`)."""
        amp = self.mixed_precision_dtype
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(
            torch.autocast(device_type=self.device.type, dtype=amp, enabled=amp is not None)
        )
        stack.enter_context(consecutive_positions())
        return stack

    @staticmethod
    def _hidden_states(body: torch.nn.Module, inps: torch.Tensor) -> torch.Tensor:
        """The body's last hidden states (what the causal LM's head is applied to)."""
        out = body(inps, use_cache=False)
        hidden = getattr(out, "last_hidden_state", None)
        return hidden if hidden is not None else out[0]

    def _body_and_head(self, tokens: torch.Tensor) -> tuple[torch.nn.Module, torch.nn.Module]:
        """The model's body (``base_model``) and output head, checked once per pair on a short
        input (the first tokens of ``tokens``): head(body(x)) must reproduce the model's own
        logits bit for bit (up to a final cast, which is kept), or the forward pass does more
        than the head (logit scaling, soft-capping, final projections) and chunked logits would
        be wrong."""
        body = getattr(self.model, "base_model", None)
        head = self.model.get_output_embeddings()
        if self._split is not None and self._split == (body, head):
            return body, head
        name = type(self.model).__name__
        if body is None or body is self.model or head is None:
            raise ChunkedHeadError(
                f"{name} has no separate body (base_model) and output head "
                "(get_output_embeddings), so its logits cannot be computed in chunks; "
                + self._advice()
            )
        x = tokens.reshape(-1)[:_HEAD_CHECK_TOKENS].view(1, -1)
        with self._forward_context():
            ref = self.model(x, use_cache=False).logits
            got = head(self._hidden_states(body, x))
        if got.shape != ref.shape or not torch.equal(got.to(ref.dtype), ref):
            diff = (
                f"max |difference| {(got.to(ref.dtype) - ref).abs().max().item():.3g}"
                if got.shape == ref.shape
                else f"shape {tuple(got.shape)} vs {tuple(ref.shape)}"
            )
            raise ChunkedHeadError(
                f"{name}: its output head applied to its body's hidden states does not give "
                f"its logits ({diff}); the forward pass does more (logit scaling or "
                "soft-capping?), so its logits cannot be computed in chunks; " + self._advice()
            )
        self._split, self._logits_dtype = (body, head), ref.dtype
        return body, head

    @staticmethod
    def _advice(length_setting: str = "eval.max_length") -> str:
        return f"lower the batch size or {length_setting}, or use a device with more memory"

    # ------------------------------------------------------------------ memory planning
    def _usable_bytes(self) -> int:
        """Bytes for activations, logits and scoring: ``memory_budget``, or the device's."""
        if self.memory_budget is not None:
            return int(self.memory_budget)
        if self._usable is None:
            self._usable = usable_memory_bytes(self.model, self.device)
        return self._usable

    def _itemsizes(self, softmax_dtype: torch.dtype | None) -> tuple[int, int, int, int]:
        """Vocabulary, hidden size, and bytes per logit and per log-softmax value."""
        weight = self.model.get_output_embeddings().weight
        vocab, hidden = int(weight.shape[0]), int(weight.shape[1])
        item = (self._logits_dtype or self.mixed_precision_dtype or weight.dtype).itemsize
        return vocab, hidden, item, softmax_dtype.itemsize if softmax_dtype else item

    def _mode(
        self,
        n_rows: int,
        width: int,
        chunks: list[tuple[int, bool]],
        softmax_dtype: torch.dtype | None,
        length_setting: str = "eval.max_length",
        record: bool = True,
    ) -> Mode:
        """The :class:`Mode` of an ``n_rows`` x ``width`` batch whose scored rows come in
        ``chunks`` of (rows, gathered as a copy): the exact path whenever it fits. ``record``:
        add it to :attr:`modes_used` (and log the first batch of each low-memory mode)."""
        usable = self._usable_bytes()
        vocab, hidden, item, soft = self._itemsizes(softmax_dtype)
        act = activation_bytes(self.model, n_rows, width)
        logits = n_rows * width * vocab * item
        widest = max((n * logit_row_bytes(vocab, item, soft, c) for n, c in chunks), default=0)
        longest = max((n for n, _ in chunks), default=1)
        per_row = logit_row_bytes(vocab, item, soft, True)
        rows = min((usable - act - logits) // per_row, longest)
        if act + logits + widest <= usable:
            mode = Mode("full", 0, act + logits + widest)
        elif rows >= min(_MIN_BLOCK_ROWS, longest):
            mode = Mode("blocked", int(rows), act + logits + rows * per_row)
        else:
            per_row = (hidden + vocab) * item + logit_row_bytes(vocab, item, soft, False)
            rows = min((usable - act) // per_row, _ROWS_PER_CHUNK, longest)
            if rows < 1:
                raise ScoringMemoryError(
                    self._memory_message(n_rows, width, per_row, usable, length_setting)
                )
            mode = Mode("head", int(rows), act + rows * per_row)
        if record and mode.kind not in self.modes_used:
            self.modes_used.add(mode.kind)
            if mode.kind != "full":
                log.info(
                    "the %s logits of a %d x %d-token batch and their scoring need %s, %s "
                    "usable: %s mode, log-softmax over blocks of %d rows%s", vocab, n_rows,
                    width, gigabytes(act + logits + widest), gigabytes(usable), mode.kind,
                    mode.block_rows, " (output head per block)" if mode.kind == "head" else "",
                )  # fmt: skip
        return mode

    def _memory_message(
        self, n_rows: int, width: int, per_row: int, usable: int, length_setting: str
    ) -> str:
        """Why a batch cannot be scored at all, with the numbers and what to change."""
        weights = model_bytes(self.model)
        act = activation_bytes(self.model, n_rows, width)
        if self.memory_budget is None:
            total = gigabytes(memory_total_bytes(self.device))
            have = f"{gigabytes(usable + weights)} of {total} are usable on {self.device}"
        else:
            have = f"{gigabytes(usable + weights)} are usable (memory_budget and the weights)"
        fixes = []
        fit_rows = (usable - per_row) // max(1, activation_bytes(self.model, 1, width))
        if n_rows > 1 and fit_rows >= 1:
            fixes.append(f"lower the batch size to {fit_rows} or less")
        fit_width = (usable - per_row) // max(1, activation_bytes(self.model, n_rows, 1))
        if 2 <= fit_width < width:
            fixes.append(f"lower {length_setting} to {fit_width} tokens or less")
        fixes.append("use a device with more memory")
        return (
            f"scoring {n_rows} x {width} tokens needs at least "
            f"{gigabytes(weights + act + per_row)} (weights {gigabytes(weights)}, activations "
            f"{gigabytes(act)}, one row of logits and its log-softmax {gigabytes(per_row)}) "
            f"but {have}: " + ", or ".join(fixes)
        )

    def check_memory(
        self,
        n_rows: int,
        width: int,
        length_setting: str = "eval.max_length",
        softmax_dtype: torch.dtype | str | None = "lm",
    ) -> Mode:
        """The mode of a worst-case batch of ``n_rows`` x ``width`` tokens, every row scored
        (rolling windows); raises before any scoring when it cannot be scored at all:
        :class:`ScoringMemoryError` (too large even for the output head per row, naming
        ``length_setting``, the batch size or the device) or :class:`ChunkedHeadError` (it needs
        the output head per block, which this model cannot take). ``softmax_dtype``: "lm" for
        the LM's own."""
        dtype = self.softmax_dtype if softmax_dtype == "lm" else softmax_dtype
        rows = [(width, False)] * n_rows
        mode = self._mode(n_rows, width, rows, dtype, length_setting, record=False)
        if mode.kind == "head":
            vocab = self.model.get_output_embeddings().weight.shape[0]
            probe = torch.arange(_HEAD_CHECK_TOKENS, device=self.device).remainder(vocab)
            self._body_and_head(probe.view(1, -1))
        return mode

    def _forward(self, inps: torch.Tensor, attn_mask: Any, labels: Any) -> torch.Tensor:
        """For causal scoring: without the unused key/value cache and without transformers' host
        sync on position ids (:mod:`kbit.evaluation.speed.nosync`); HFLM's call otherwise."""
        if self.kv_cache or attn_mask is not None or labels is not None:
            return super()._forward(inps, attn_mask, labels)
        amp = self.mixed_precision_dtype
        with (
            torch.no_grad(),
            torch.autocast(device_type=self.device.type, dtype=amp, enabled=amp is not None),
            consecutive_positions(),
        ):
            return self.model(inps, use_cache=False).logits
