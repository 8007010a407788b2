"""CUDA graphs for the fast scoring loop: a planned batch captured once, replayed per config.

With ``cuda_graphs=True`` (CUDA only, inside ``reuse_plans``) each planned batch's forward pass
and scoring are captured once as a CUDA graph and replayed for every later weight config, instead
of issuing its few hundred kernels from Python again. Short requests (PIQA, Winogrande,
HellaSwag) leave a GPU waiting for the host much of the time with a 1.4B-parameter model, and a
160M one almost always. Weights are changed in place between configs, which a graph sees; a batch
is captured again if any parameter or buffer has moved (e.g. untied). Every capture is checked:
the batch is first scored eagerly (those results are returned), then captured and replayed, and
the two must agree in every bit, or graphs are turned off for good with one warning. So graphs
never change a result; they switch themselves off where capture would take another path
(transformers 5.17, for one, builds an explicit attention mask under capture, whose attention
kernel rounds differently; 5.23 does not; a forward pass that syncs with the host cannot be
captured at all). Position ids are known to be unpacked during capture as in eager passes
(:mod:`kbit.evaluation.speed.nosync`). With graphs, a batch's forward time also covers its
scoring kernels.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kbit.evaluation.speed.scoring import Batch, Plan

log = logging.getLogger("kbit.evaluation")


class CudaGraphs:
    """Mixin of :class:`~kbit.evaluation.speed.scoring.FastLM`: capture, check and replay."""

    cuda_graphs: bool = False
    #: set when a capture failed or differed from its eager pass: graphs stay off for good
    graphs_broken: bool = False
    _graph_pool: Any = None
    _graph_stream: torch.cuda.Stream | None = None

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

    def _replay(self, batch: Batch, weights: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
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
            self.graphs_broken = True
            log.warning("CUDA graphs off (%s); scoring eagerly", reason)
        return eager

    def release_graphs(self) -> None:
        """Release every captured graph of the cached plans (graphs turned off by policy)."""
        for plan in self._plans.values():
            for b in plan.batches:
                b.release_graph()
        self._graph_pool, self._graph_stream = None, None

    def _drop_graphs(self, current: Plan) -> None:
        """Release every captured graph (of the cached plans and of ``current``)."""
        for plan in [*self._plans.values(), current]:
            for b in plan.batches:
                b.release_graph()
        self._graph_pool, self._graph_stream = None, None

    def _capture(self, batch: Batch) -> None:
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
        self.timing = False
        try:
            yield
        finally:
            self.timing = True


# ----------------------------------------------------------------------------- when graphs pay
#: where measured capture costs and savings are kept between jobs (per GPU and model shape)
GRAPH_CACHE = "graphs.json"
#: leading specs of a job that pay its one-time costs and are never a timing reference
WARMUP_SPECS = 1


def _cache_path() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kbit"
    return root / GRAPH_CACHE


@dataclass
class GraphPolicy:
    """Decides, by measurement, whether the batched job replays CUDA graphs.

    Capture is not free: the first graphed spec scores every batch eagerly, captures it and
    replays it once to check it (cost ``C`` over an eager spec), and every later spec saves the
    host time Python needs to issue the kernels (``S`` per spec). Both depend on the GPU, the
    model, the batch size and the tasks (an H100 at batch 64 saved 1.5 s per 1.4B spec for an
    11.3 s capture; an H200 at batch 160 saved 0.2 s for a 10 s capture), so a fixed spec count
    is wrong somewhere. The policy measures instead. Spec 0 pays the job's one-time costs (CUDA
    and library warm-up, tokenizing every request; 4x a later spec for Pythia-160M on an H200),
    so it is no reference: it runs eagerly and unmeasured. Spec 1 runs eagerly (its wall time
    ``E``); spec 2 captures when the remaining specs can repay a capture (from the cached
    ``C``/``E`` and ``S``/``E`` of this GPU and model shape; with no cache entry, when at least
    three specs remain to learn on); spec 3 replays, which gives ``S``; graphs stay on only while
    ``S > 0`` (the capture is paid by then). The measurements are cached per (GPU, model shape,
    batch size) for the next job, and every decision is logged with its numbers.

    ``mode``: ``"auto"`` (the above), ``True`` or ``False`` (forced).
    """

    mode: bool | str
    n_specs: int
    key: str
    cache_file: Path | None = None
    eager_s: float | None = None
    capture_s: float | None = None
    saving_s: float | None = None
    decisions: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cache_file = self.cache_file or _cache_path()

    def _cached(self) -> dict[str, float] | None:
        try:
            return json.loads(Path(self.cache_file).read_text()).get(self.key)
        except (OSError, ValueError):
            return None

    def _store(self) -> None:
        if not (self.eager_s and self.capture_s is not None and self.saving_s is not None):
            return
        try:
            data = json.loads(Path(self.cache_file).read_text())
        except (OSError, ValueError):
            data = {}
        data[self.key] = {
            "capture_over_eager": self.capture_s / self.eager_s,
            "saving_over_eager": self.saving_s / self.eager_s,
        }
        try:
            from kbit.io import write_json

            write_json(data, self.cache_file)
        except OSError:
            pass

    def use(self, i: int, graphs_ok: bool = True) -> bool:
        """Whether spec ``i`` (0-based among the specs left) is scored with graphs."""
        if self.mode is not True and self.mode is not False and self.mode != "auto":
            raise ValueError(f"cuda_graphs={self.mode!r}: allowed are 'auto', true, false")
        if not graphs_ok:
            return False
        if self.mode is not True and self.mode is not False:
            return self._auto(i)
        return bool(self.mode)

    def _auto(self, i: int) -> bool:
        left = self.n_specs - i  # including spec i
        if i <= WARMUP_SPECS or self.eager_s is None:
            return False
        if i == WARMUP_SPECS + 1:
            cached = self._cached()
            if cached:
                c = cached["capture_over_eager"] * self.eager_s
                s = cached["saving_over_eager"] * self.eager_s
                on = (left - 1) * s > c
                self._say(
                    f"CUDA graphs {'on' if on else 'off'}: cached capture cost {c:.2f} s, saving "
                    f"{s:.2f} s per spec, {left - 1} specs to repay it"
                )
                return on
            on = left >= 3
            self._say(
                f"CUDA graphs {'measured' if on else 'off'}: no cached cost on this GPU and model, "
                f"{left} specs left"
            )
            return on
        if self.capture_s is None:  # the capture spec ran eagerly: stay eager
            return False
        if self.saving_s is None:
            return True  # the first replay, which measures the saving
        return self.saving_s > 0

    def record(self, i: int, wall_s: float, graphs: bool) -> None:
        """The wall time of spec ``i`` and whether it ran with graphs."""
        if i < WARMUP_SPECS:
            return  # one-time costs: no reference
        if i == WARMUP_SPECS and not graphs:
            self.eager_s = wall_s
        elif graphs and self.capture_s is None and self.eager_s is not None:
            self.capture_s = max(wall_s - self.eager_s, 0.0)
        elif graphs and self.saving_s is None and self.eager_s is not None:
            self.saving_s = self.eager_s - wall_s
            self._store()
            left = self.n_specs - i - 1
            self._say(
                f"CUDA graphs measured: capture cost {self.capture_s:.2f} s, saving "
                f"{self.saving_s:.2f} s per spec against eager spec {WARMUP_SPECS} "
                f"({self.eager_s:.2f} s); {'kept on' if self.saving_s > 0 else 'off'} "
                f"for the {left} specs left"
            )

    def _say(self, text: str) -> None:
        self.decisions.append(text)
        log.info(text)
