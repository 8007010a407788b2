"""Where a CUDA-graph replay of a forward pass differs from the eager pass, and what each costs.

Builds a random-weight Pythia-shaped model in fp16 (the 1.4B or 160M shape of bench_eval), then:

1. per batch shape (64 x 24, 64 x 40, 64 x 110 tokens): the host time to issue 20 eager forward
   passes, their wall time and GPU span (issue time == wall time: the host is the slower side);
2. counts the device-to-host syncs of one eager forward pass (``torch.cuda.set_sync_debug_mode``);
3. a CPU profile of five forward passes (self CPU time per op);
4. every module's output of one 64 x 110 batch, eager against a captured and replayed CUDA graph
   (forward hooks copy into static buffers during capture): the first module that differs and
   how many do, and the kernels that run only in one of the two;
5. per batch shape, the replayed graph's time per forward pass and whether it equals eager.

``--nosync`` runs every forward pass inside ``kbit.evaluation.speed.nosync.consecutive_positions``.

Usage (on a CUDA machine)::

    PYTHONPATH=$PWD python3 benchmarks/graph_vs_eager.py [--size 1.4b] [--nosync]
"""

import argparse
import collections
import contextlib
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_eval import random_pythia  # noqa: E402

from kbit.evaluation.speed.nosync import consecutive_positions  # noqa: E402

SHAPES = [(64, 24), (64, 40), (64, 110)]


def capture(fwd: Callable, x: torch.Tensor, stream: torch.cuda.Stream) -> tuple:
    """``fwd(x)`` captured as a CUDA graph (after a warm-up on the capture stream), replayed
    once; returns the graph and its output tensor."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fwd(x)  # lazily created handles and workspaces must exist before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = fwd(x)
    graph.replay()
    torch.cuda.synchronize()
    return graph, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1.4b", choices=["160m", "1.4b"])
    ap.add_argument("--nosync", action="store_true")
    args = ap.parse_args()
    import transformers

    print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version(),
          "transformers", transformers.__version__, "nosync", args.nosync, flush=True)  # fmt: skip
    m = random_pythia(args.size).eval()
    print("attn", m.config._attn_implementation, flush=True)
    ctx = consecutive_positions if args.nosync else contextlib.nullcontext

    def fwd(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), ctx():
            return m(x, use_cache=False).logits

    g = torch.Generator(device="cuda").manual_seed(1)
    n = 20
    for b, length in SHAPES:  # 1. host issue time against wall time
        x = torch.randint(0, 50000, (b, length), device="cuda", generator=g)
        for _ in range(3):
            fwd(x)
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        s.record()
        for _ in range(n):
            fwd(x)
        t1 = time.perf_counter()
        e.record()
        e.synchronize()
        t2 = time.perf_counter()
        span = s.elapsed_time(e) / n
        print(f"shape {b}x{length}: cpu issue {1e3 * (t1 - t0) / n:.2f} ms/fwd, wall "
              f"{1e3 * (t2 - t0) / n:.2f}, gpu span {span:.2f}", flush=True)  # fmt: skip
        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            try:
                with sdpa_kernel(getattr(SDPBackend, name)):
                    for _ in range(3):
                        fwd(x)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    for _ in range(n):
                        fwd(x)
                    t1 = time.perf_counter()
                    torch.cuda.synchronize()
                    t2 = time.perf_counter()
                print(f"   {name}: cpu issue {1e3 * (t1 - t0) / n:.2f} ms/fwd "
                      f"wall {1e3 * (t2 - t0) / n:.2f}", flush=True)  # fmt: skip
            except RuntimeError as exc:
                print("   ", name, "failed", exc)

    x = torch.randint(0, 50000, (64, 24), device="cuda", generator=g)  # 2. syncs
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fwd(x)
    torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message)[:120] for w in caught if "synchroniz" in str(w.message)]
    print("sync warnings in forward:", len(syncs), syncs[:3], flush=True)

    with profile(activities=[ProfilerActivity.CPU]) as p:  # 3. CPU profile
        for _ in range(5):
            fwd(x)
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15,
                                 max_name_column_width=50), flush=True)  # fmt: skip

    # 4. every module's output, eager against a replayed graph
    names = {mod: (n or "<root>") for n, mod in m.named_modules()}
    order: list[str] = []
    eager_out: dict[str, torch.Tensor] = {}
    static: dict[str, torch.Tensor] = {}
    mode = {"m": "eager"}

    def hook(mod: torch.nn.Module, _args: tuple, out: object) -> None:
        t = out[0] if isinstance(out, tuple) else out
        t = getattr(t, "logits", getattr(t, "last_hidden_state", t))
        if not torch.is_tensor(t):
            return
        name = names[mod]
        if mode["m"] == "eager":
            eager_out[name] = t.detach().clone()
            order.append(name)
        else:
            if name not in static:
                static[name] = torch.empty_like(t)
            static[name].copy_(t)

    hooks = [mod.register_forward_hook(hook) for mod in names]
    x = torch.randint(0, 50000, (64, 110), device="cuda", generator=g)
    fwd(x)
    mode["m"] = "graph"
    st = torch.cuda.Stream()
    graph, out = capture(fwd, x, st)
    differ = [n for n in order if n in static and not torch.equal(eager_out[n], static[n])]
    if differ:
        a, b = eager_out[differ[0]].float(), static[differ[0]].float()
        print("first differing module:", differ[0], "max abs", (a - b).abs().max().item(),
              "fraction", (a != b).float().mean().item(), flush=True)  # fmt: skip
    print("modules differing:", len(differ), "of", len(order), flush=True)
    print("logits equal", torch.equal(out, eager_out["<root>"]), flush=True)
    for h in hooks:
        h.remove()
    with profile(activities=[ProfilerActivity.CUDA]) as p1:
        fwd(x)
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p2:
        graph.replay()
        torch.cuda.synchronize()
    k1 = collections.Counter(e.key for e in p1.key_averages() if e.device_time_total > 0)
    k2 = collections.Counter(e.key for e in p2.key_averages() if e.device_time_total > 0)
    print("kernels only eager:", sorted(set(k1) - set(k2))[:20])
    print("kernels only graph (hook copies included):", sorted(set(k2) - set(k1))[:20], flush=True)

    for b, length in SHAPES:  # 5. replay time per shape
        x = torch.randint(0, 50000, (b, length), device="cuda", generator=g)
        gr, o = capture(fwd, x, st)
        ref = fwd(x)
        t0 = time.perf_counter()
        for _ in range(n):
            gr.replay()
        torch.cuda.synchronize()
        print(f"graph {b}x{length}: {1e3 * (time.perf_counter() - t0) / n:.2f} ms/fwd, "
              f"equal to eager {torch.equal(o, ref)}", flush=True)  # fmt: skip
        del gr, o


if __name__ == "__main__":
    main()
