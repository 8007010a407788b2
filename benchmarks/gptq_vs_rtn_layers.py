"""GPTQ against round-to-nearest, layer by layer, on a real model's weights, for every codebook.

For the linear layers of a few transformer blocks, the Hessian H = 2 X X^T is accumulated from the
unquantized model's inputs to that layer over calibration tokens; then each spec is applied with
GPTQ and with round-to-nearest, and the relative output error

    tr((W - W_hat) H (W - W_hat)^T) / tr(W H W^T)   (= ||W X - W_hat X||^2 / ||W X||^2)

of both is reported (``kbit.gptq.gptq_layer``). GPTQ minimises exactly this quantity column by
column, so a codebook where it is not below round-to-nearest would point at a defect.

    python benchmarks/gptq_vs_rtn_layers.py --model resources/models/smollm2-135m \\
        --tokens results/smollm2/tokens/smollm2-135m/gptq.safetensors \\
        --out benchmarks/results/gptq_vs_rtn_smollm2_cpu
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from kbit.gptq import _add_hessian, gptq_layer
from kbit.io import write_json, write_text
from kbit.loading import load_causal_lm

#: every codebook at 3 and 4 bits (the microscaling formats at the bit widths they define)
SPECS = (
    "int3-b64", "int4-b64",
    "float3-e2-b64", "float4-e2-b64", "float4-e3-b64",
    "dynamic3-b64", "dynamic4-b64",
    "quantile3-b64", "quantile4-b64",
    "nf3-b64", "nf4-b64",
    "mxint3-b32", "mxint4-b32", "mxfp4-e2-b32", "nvfp4-e2-b16",
    "int3-bt", "int4-bt",
)  # fmt: skip


def layer_hessians(
    model: torch.nn.Module, tokens: torch.Tensor, blocks: list[int]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(weight, H) of every nn.Linear inside the chosen decoder blocks, H summed in float32 over
    the tokens (the unquantized model's activations)."""
    layers = model.model.layers
    hess: dict[str, torch.Tensor] = {}
    handles = []
    linears = {}
    for b in blocks:
        for name, mod in layers[b].named_modules():
            if isinstance(mod, torch.nn.Linear):
                key = f"layers.{b}.{name}"
                linears[key] = mod

                def hook(m, args, _out, key=key):
                    if key not in hess:
                        n = args[0].shape[-1]
                        hess[key] = torch.zeros(n, n, dtype=torch.float32)
                    _add_hessian(hess[key], args[0])  # GPTQ's own accumulation

                handles.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for row in tokens:
            model(row[None])
    for h in handles:
        h.remove()
    return {k: (linears[k].weight.detach().float().clone(), hess[k]) for k in linears}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="local model directory")
    ap.add_argument("--tokens", required=True, help="calibration tokens (safetensors 'tokens')")
    ap.add_argument("--n-samples", type=int, default=8, help="calibration windows used")
    ap.add_argument("--blocks", default="0,15,29", help="decoder blocks whose layers are tested")
    ap.add_argument("--out", required=True, help="output stem (.json and .md are written)")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = load_causal_lm(args.model, dtype=torch.float32, device="cpu").eval()
    tokens = load_file(args.tokens)["tokens"][: args.n_samples]
    blocks = [int(b) for b in args.blocks.split(",")]
    t0 = time.perf_counter()
    layers = layer_hessians(model, tokens, blocks)
    rows = []
    for spec in SPECS:
        for name, (w, h) in layers.items():
            r = gptq_layer(w, h, spec)
            rows.append({"spec": spec, "layer": name, "error_gptq": r.error_gptq,
                         "error_rtn": r.error_rtn, "damp": r.damp})  # fmt: skip
    seconds = time.perf_counter() - t0

    lines = [
        f"# GPTQ vs round-to-nearest per layer: {Path(args.model).name}",
        "",
        f"Relative output error tr(E H E^T) / tr(W H W^T) of {len(layers)} linear layers "
        f"(blocks {args.blocks}), H from {len(tokens)} x {tokens.shape[1]} calibration tokens "
        f"through the unquantized model; {platform.processor() or platform.machine()} CPU, "
        f"{seconds:.0f} s in all.",
        "",
        "| spec | mean error RTN | mean error GPTQ | GPTQ / RTN (mean of ratios) "
        "| layers GPTQ < RTN |",
        "|---|---|---|---|---|",
    ]
    summary = []
    for spec in SPECS:
        rs = [r for r in rows if r["spec"] == spec]
        rtn = sum(r["error_rtn"] for r in rs) / len(rs)
        gq = sum(r["error_gptq"] for r in rs) / len(rs)
        ratio = sum(r["error_gptq"] / r["error_rtn"] for r in rs) / len(rs)
        better = sum(r["error_gptq"] < r["error_rtn"] for r in rs)
        summary.append({"spec": spec, "rtn": rtn, "gptq": gq, "ratio": ratio, "better": better,
                        "layers": len(rs)})  # fmt: skip
        lines.append(f"| {spec} | {rtn:.4g} | {gq:.4g} | {ratio:.3f} | {better} of {len(rs)} |")
    out = Path(args.out)
    write_json({"model": args.model, "blocks": blocks, "n_samples": len(tokens),
                "seq_len": int(tokens.shape[1]), "seconds": seconds, "summary": summary,
                "rows": rows}, out.with_suffix(".json"))  # fmt: skip
    write_text("\n".join(lines) + "\n", out.with_suffix(".md"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
