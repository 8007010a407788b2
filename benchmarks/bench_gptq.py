"""Time of GPTQ on a Pythia-1.4B-shaped model, split into its phases.

The model is a GPT-NeoX config with Pythia-1.4B's shapes (hidden 2048, 24 layers, 16 heads, FFN
8192, vocabulary 50304) and random weights, in fp16 on CUDA; calibration is 128 sequences of
2048 random token ids (timing does not depend on the ids). Each spec runs
:func:`kbit.gptq.gptq_quantize_model` on the same weights (restored between specs) and reports
seconds spent in calibration forward passes, Hessian accumulation, factorisation and the column
loop (the rest: writing weights, error bookkeeping), plus the column loop's microseconds per
column. Target: <= 60 s per spec on one H200.

``--check`` first verifies the device path: with a diagonal Hessian GPTQ must equal
``kbit.quantize`` bit for bit on the device, and GPTQ on the device must choose the same codes as
on the CPU except for rare near ties. ``--profile`` runs one qkv-shaped layer (6144 x 2048)
under the torch profiler and writes the operator table (kernels per column).

Usage: python benchmarks/bench_gptq.py --out DIR [--specs int4-b64,nf4-b64] [--act-order]
       [--samples 128] [--seq-len 2048] [--batch-size 8] [--check] [--profile] [--tiny]
``--tiny``: a 2-layer hidden-64 model and 8 x 64 tokens on the CPU, a smoke check of the script.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kbit.blockwise import quantize
from kbit.gptq import gptq_layer, gptq_quantize_model
from kbit.io import write_json, write_text
from kbit.model_quant import WeightSnapshot

PYTHIA_1_4B = {
    "hidden_size": 2048,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 8192,
    "vocab_size": 50304,
    "max_position_embeddings": 2048,
    "rotary_pct": 0.25,
    "use_parallel_residual": True,
    "tie_word_embeddings": False,
}
TINY = {**PYTHIA_1_4B, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 256, "vocab_size": 1000}  # fmt: skip


def build_model(shape: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A randomly initialised GPT-NeoX model, created directly on ``device``."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    config = GPTNeoXConfig(**shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = GPTNeoXForCausalLM(config)
    return model.to(dtype).eval()


def column_count(model: torch.nn.Module) -> int:
    """Input columns GPTQ walks through: the in_features of every block linear."""
    from kbit.model_quant import block_linear_names, weight_out_in

    return sum(weight_out_in(model.get_submodule(n)).shape[1] for n in block_linear_names(model))


def check_device(device: torch.device) -> dict:
    """Bit-exactness against kbit.quantize (diagonal H) and agreement with the CPU."""
    g = torch.Generator().manual_seed(0)
    out = {}
    w = (torch.randn(96, 384, generator=g) * 0.05).to(torch.float16)
    diag = torch.diag(torch.rand(384, generator=g) + 0.5)
    for spec in ("int4-b64", "nf4-b40", "float3-bt", "quantile4-b64-c", "mxfp4", "nvfp4"):
        q = gptq_layer(w.to(device), diag.to(device), spec, act_order=True, errors=False).qtensor
        ref = quantize(w.to(device), spec)
        same = torch.equal(q.codes, ref.codes) and torch.equal(
            q.scales.view(torch.uint8), ref.scales.view(torch.uint8)
        )
        out[f"diagonal_h_equals_rtn/{spec}"] = bool(same)
    x = torch.randn(2048, 384, generator=g)
    h = 2 * x.t() @ x
    for spec in ("int4-b64", "nf4-b40", "mxfp4"):
        for act_order in (False, True):
            kw = {"act_order": act_order, "errors": False}
            cpu = gptq_layer(w, h, spec, **kw).qtensor.unpacked_codes()
            codes = {
                graphs: gptq_layer(w.to(device), h.to(device), spec, cuda_graphs=graphs, **kw)
                .qtensor.unpacked_codes()
                .cpu()
                for graphs in (False, True)
            }
            tag = f"{spec}{'/act_order' if act_order else ''}"
            out[f"graphs_equal_eager/{tag}"] = bool(torch.equal(codes[True], codes[False]))
            out[f"codes_differing_from_cpu/{tag}"] = int((codes[True] != cpu).sum())
    out.update(check_hessian(device))
    out.update(check_models(device))
    print(f"check: {out}", flush=True)
    return out


def check_hessian(device: torch.device) -> dict:
    """H = 2 X^T X from fp16 activations: whether the fp32-output fp16 product is available,
    and the relative error of the accumulated H against float64."""
    from kbit.gptq import _add_hessian

    x = torch.randn(4096, 512, device=device).to(torch.float16)
    h = torch.zeros(512, 512, device=device)
    _add_hessian(h, x)
    ref = 2 * x.double().t() @ x.double()
    try:
        torch.mm(x.t(), x, out_dtype=torch.float32)
        out_dtype = True
    except (TypeError, RuntimeError, NotImplementedError):
        out_dtype = False
    rel = float((h.double() - ref).norm() / ref.norm())
    return {"hessian_fp16_out_dtype": out_dtype, "hessian_rel_error": rel}


def check_models(device: torch.device) -> dict:
    """Model-level GPTQ in fp16 on the device for GPT-2 (Conv1D) and Llama (GQA, tied)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    configs = {
        "gpt2": (GPT2LMHeadModel, GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=512)),
        "llama": (LlamaForCausalLM, LlamaConfig(hidden_size=128, intermediate_size=352,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=512, tie_word_embeddings=True)),
    }  # fmt: skip
    out = {}
    calib = torch.randint(0, 512, (16, 64), generator=torch.Generator().manual_seed(0))
    for arch, (cls, config) in configs.items():
        torch.manual_seed(0)
        model = cls(config).to(device, torch.float16).eval()
        _, report = gptq_quantize_model(model, "int3-b32-o0.02", calib, quantize_lm_head=True)
        gptq = [e for e in report["layers"] if e["method"] == "gptq"]
        out[f"model/{arch}/gptq_layers"] = len(gptq)
        out[f"model/{arch}/gptq_below_rtn"] = sum(e["error_gptq"] < e["error_rtn"] for e in gptq)
        out[f"model/{arch}/finite"] = all(torch.isfinite(p).all() for p in model.parameters())
    return out


def profile_layer(device: torch.device, spec: str, out_dir: Path) -> dict:
    """One qkv-shaped layer (6144 x 2048): column-loop time with and without CUDA graphs, and
    the eager loop under the torch profiler (its operator table is written to ``out_dir``)."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(6144, 2048, device=device, generator=g, dtype=torch.float16) * 0.02
    x = torch.randn(8192, 2048, device=device, generator=g)
    h = 2 * x.t() @ x
    info: dict = {"shape": [6144, 2048], "spec": spec}
    for graphs in (False, True):
        gptq_layer(w, h, spec, errors=False, cuda_graphs=graphs)  # warm-up
        res = gptq_layer(w, h, spec, errors=False, cuda_graphs=graphs)
        info[f"us_per_column_graphs_{'on' if graphs else 'off'}"] = 1e6 * res.seconds_columns / 2048
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        gptq_layer(w, h, spec, errors=False, cuda_graphs=False)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25)
    write_text(table, out_dir / "gptq_profile.txt")
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    info["kernels_per_column_eager"] = sum(e.count for e in kernels) / 2048
    print(table, flush=True)
    print(f"profile: {info}", flush=True)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="directory for the JSON results")
    ap.add_argument("--specs", default="int4-b64,nf4-b64", help="comma-separated quant specs")
    ap.add_argument("--act-order", action="store_true", help="also time each spec with act-order")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--check", action="store_true", help="verify the device path first")
    ap.add_argument("--profile", action="store_true", help="profile one qkv-shaped layer")
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU (smoke check)")
    args = ap.parse_args(argv)

    if args.tiny:
        device, dtype, shape = torch.device("cpu"), torch.float32, TINY
        torch.set_num_threads(1)  # tiny kernels: threads only add overhead
        args.samples, args.seq_len = min(args.samples, 8), min(args.seq_len, 64)
    elif torch.cuda.is_available():
        device, dtype, shape = torch.device("cuda"), torch.float16, PYTHIA_1_4B
    else:
        print("no CUDA device: run with --tiny for a CPU smoke check", file=sys.stderr)
        return 2
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    result: dict = {
        "device": gpu or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model": {"arch": "gpt_neox", **shape, "dtype": str(dtype).replace("torch.", "")},
        "calibration": {
            "samples": args.samples,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
        },
    }
    if args.check:
        result["check"] = check_device(device)
    if args.profile:
        result["profile"] = profile_layer(device, args.specs.split(",")[0], args.out)

    t0 = time.perf_counter()
    model = build_model(shape, device, dtype)
    result["seconds_build_model"] = time.perf_counter() - t0
    columns = column_count(model)
    snapshot = WeightSnapshot(model)
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, shape["vocab_size"], (args.samples, args.seq_len), generator=g)
    gptq_layer(torch.randn(256, 256, device=device), torch.eye(256, device=device), "int4-b64")

    runs = []
    for spec in args.specs.split(","):
        for act_order in (False, True) if args.act_order else (False,):
            snapshot.restore(model)
            t0 = time.perf_counter()
            _, report = gptq_quantize_model(
                model, spec, calib, act_order=act_order, batch_size=args.batch_size, log=print
            )
            wall = time.perf_counter() - t0
            layers = [e for e in report["layers"] if e["method"] == "gptq"]
            timing = report["timing"]
            run = {
                "spec": spec,
                "act_order": act_order,
                "seconds_wall": wall,
                "timing": timing,
                "columns": columns,
                "us_per_column": 1e6 * timing["columns"] / columns,
                "layers": len(layers),
                "max_escalations": max(e["escalations"] for e in layers),
                "mean_error_gptq": sum(e["error_gptq"] for e in layers) / len(layers),
                "mean_error_rtn": sum(e["error_rtn"] for e in layers) / len(layers),
                "gptq_below_rtn": sum(e["error_gptq"] < e["error_rtn"] for e in layers),
            }
            runs.append(run)
            parts = " ".join(f"{k}={v:.2f}s" for k, v in timing.items())
            print(f"{spec} act_order={act_order}: wall {wall:.1f}s ({parts}); column loop "
                  f"{run['us_per_column']:.1f} us/column; rel. error GPTQ "
                  f"{run['mean_error_gptq']:.4g} vs RTN {run['mean_error_rtn']:.4g}",
                  flush=True)  # fmt: skip
    result["runs"] = runs
    name = "gptq_tiny.json" if args.tiny else "gptq_" + _slug(result["device"]) + ".json"
    write_json(result, args.out / name)
    print(f"wrote {args.out / name}")
    return 0


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")


if __name__ == "__main__":
    sys.exit(main())
