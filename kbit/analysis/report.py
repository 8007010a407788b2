"""Self-contained HTML pages of the claims and the tables, for reading without downloads.

The Snakemake report shows an HTML result inline (in a frame) but offers Markdown and Parquet
files only as downloads, so the analysis writes HTML renderings beside them: ``claims.html``
(the verdicts, each family's scaling signal, the diverged runs and every finding's evidence)
and ``tables/scores.html`` / ``tables/runs.html`` (compact pivots: per family, models x quant
configurations with mean zero-shot accuracy, perplexity and model size; the runs' cost and
provenance). Each page carries its own style sheet and no scripts.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from kbit.analysis.claims import FAILS, HOLDS, NA, Claim
from kbit.analysis.curves import ACCURACY_TARGET, BASELINE, perplexity_target
from kbit.analysis.figures import describe_run, diverged_runs, format_bytes
from kbit.io import write_text

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; color: #222; margin: 1.2em 2em; max-width: 90em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
thead th { background: #f0f0f0; position: sticky; top: 0; }
tbody tr:nth-child(even) { background: #fafafa; }
.best { font-weight: 700; }
.diverged { color: #b00020; font-style: italic; }
.verdict { font-weight: 700; padding: 1px 6px; border-radius: 3px; white-space: nowrap; }
.holds { background: #d8f0dd; color: #0b5d1e; }
.fails { background: #fbdcdc; color: #8a1010; }
.na { background: #ececec; color: #444; }
.test { color: #444; } code { font-size: 12px; }
details { margin: .4em 0 1em; } summary { cursor: pointer; font-weight: 600; }
"""
VERDICT_CLASS = {HOLDS: "holds", FAILS: "fails", NA: "na"}


def _e(x) -> str:
    return html.escape(str(x))


def page(title: str, body: str) -> str:
    """A complete HTML document with the shared style sheet."""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{CSS}</style></head>\n"
        f"<body>\n<h1>{_e(title)}</h1>\n{body}\n</body></html>\n"
    )


def html_table(
    header: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[bool] | None = None
) -> str:
    """A table from already escaped cell HTML; ``numeric`` right-aligns columns."""
    numeric = list(numeric or [False] * len(header))
    head = "".join(f"<th>{h}</th>" for h in header)
    body = []
    for r in rows:
        cells = "".join(
            f"<td class='num'>{c}</td>" if n else f"<td>{c}</td>"
            for c, n in zip(r, numeric, strict=True)
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def verdict_badge(verdict: str) -> str:
    return f"<span class='verdict {VERDICT_CLASS.get(verdict, 'na')}'>{_e(verdict)}</span>"


# ----------------------------------------------------------------------------- claims
def claims_html(claims: list[Claim], title: str = "The paper's findings on this run") -> str:
    """The claims as one HTML page: summary table, scaling signals, diverged runs, evidence."""
    parts = [
        "<p>Intervals are 95% paired document-bootstrap percentile intervals; gains are "
        "positive when the first configuration is better. A finding that compares precisions "
        "or configurations needs a <em>scaling signal</em>: the family's accuracy (or "
        "perplexity) must improve significantly with model size, else it is excluded.</p>",
        html_table(
            ["#", "finding", "name", "verdict"],
            (
                [
                    f"<a href='#finding-{_e(c.number)}'>{_e(c.number)}</a>",
                    _e(c.statement),
                    f"<code>{_e(c.name)}</code>" if c.name else "",
                    verdict_badge(c.verdict),
                ]
                for c in claims
            ),
        ),
    ]
    signals = getattr(claims, "signals", None)
    if signals is not None and len(signals):
        parts.append("<h2>Scaling signal per family</h2>")
        parts.append(
            html_table(
                ["family", "target", "curve", "sizes", "slope per doubling", "95% interval", "?"],
                (
                    [
                        _e(r.family),
                        _e(r.target),
                        _e(r.curve),
                        _e(r.n_models),
                        "" if pd.isna(r.slope) else f"{r.slope:+.4f}",
                        "" if pd.isna(r.ci_low) else f"[{r.ci_low:+.4f}, {r.ci_high:+.4f}]",
                        "yes" if r.signal else "<span class='diverged'>no</span>",
                    ]
                    for r in signals.itertuples()
                ),
                [False, False, False, True, True, True, False],
            )
        )
    diverged = getattr(claims, "diverged", None)
    if diverged is not None and len(diverged):
        parts.append("<h2>Diverged runs (in no curve)</h2>")
        parts.append(
            html_table(
                ["run", "family", "why"],
                (
                    [_e(describe_run(r)), _e(r["family"]), _e(r["reason"])]
                    for r in diverged.to_dict("records")
                ),
            )
        )
    for c in claims:
        evidence = "".join(f"<li>{_e(x)}</li>" for x in c.evidence) or "<li>no data</li>"
        parts.append(
            f"<h2 id='finding-{_e(c.number)}'>Finding {_e(c.number)} "
            + (f"<code>{_e(c.name)}</code> " if c.name else "")
            + f"{verdict_badge(c.verdict)}</h2>"
            f"<p>{_e(c.statement)}</p><p class='test'><em>Test.</em> {_e(c.test)}</p>"
            f"<ul>{evidence}</ul>"
        )
    return page(title, "\n".join(parts))


def write_claims(claims: list[Claim], md_path: str | Path, html_path: str | Path | None) -> None:
    """``claims.md`` and, when a path is given, ``claims.html`` (atomically)."""
    from kbit.analysis.claims import render_claims

    write_text(render_claims(claims), md_path)
    if html_path is not None:
        write_text(claims_html(claims), html_path)


def skipped_html(skipped: list[tuple[str, str]]) -> str:
    """The figures not drawn and the data each needs, as a page (``SKIPPED.md`` in HTML)."""
    if not skipped:
        return page("Skipped figures", "<p>None: every figure had its data.</p>")
    rows = ([f"<code>{_e(n)}</code>", _e(why)] for n, why in skipped)
    intro = "<p>These figures were not drawn: the study did not produce the data they need.</p>"
    return page("Skipped figures", intro + html_table(["figure", "data it needs"], rows))


# ----------------------------------------------------------------------------- tables
def _spec_order(df: pd.DataFrame) -> list[str]:
    """Quant ids in reading order: by precision (baseline last), data type, block size, rest."""
    specs = df.drop_duplicates("quant").set_index("quant")

    def key(q: str) -> tuple:
        r = specs.loc[q]
        base = r.get("dtype") == BASELINE or q == BASELINE
        bits = 99 if base else r.get("bits", 99)
        block = r.get("block_size")
        return (
            bool(base),
            float(bits) if pd.notna(bits) else 99.0,
            str(r.get("method", "rtn")),
            str(r.get("dtype", "")),
            float(block) if pd.notna(block) else np.inf,
            q,
        )

    return sorted(specs.index, key=key)


def _pivot(
    rows: pd.DataFrame,
    models: list[str],
    quants: list[str],
    fmt: Callable[[float], str],
    lower_is_better: bool | None,
    diverged: set[tuple[str, str]],
    params: dict[str, str] | None = None,
) -> str:
    """Quant configurations (rows) x models (columns, smallest first): few columns however
    many configurations a study has. Each model's best finite value is bold; diverged cells
    are marked; configurations without a value for any model are left out."""
    vals = rows.drop_duplicates(["model", "quant"]).set_index(["model", "quant"])["value"]
    params = params or {}

    def finite(m: str, q: str) -> bool:
        return (m, q) in vals.index and bool(np.isfinite(vals[(m, q)])) and (m, q) not in diverged

    best = {}
    if lower_is_better is not None:
        for m in models:
            ok = {q: float(vals[(m, q)]) for q in quants if finite(m, q)}
            if ok:
                best[m] = (min if lower_is_better else max)(ok, key=ok.get)
    body = []
    for q in quants:
        if not any((m, q) in vals.index for m in models):
            continue
        cells = []
        for m in models:
            if (m, q) in diverged:
                cells.append("<span class='diverged'>diverged</span>")
            elif finite(m, q):
                text = _e(fmt(float(vals[(m, q)])))
                cells.append(f"<span class='best'>{text}</span>" if best.get(m) == q else text)
            else:
                cells.append("")
        body.append([f"<code>{_e(q)}</code>", *cells])
    header = [f"{_e(m)}<br><small>{_e(params.get(m, ''))}</small>" for m in models]
    return html_table(["quant config", *header], body, [False] + [True] * len(models))


def _param_labels(g: pd.DataFrame) -> dict[str, str]:
    """``{model: "1.4B params"}`` from the ``n_params`` column, when present."""
    if "n_params" not in g:
        return {}
    out = {}
    for m, n in g.drop_duplicates("model").set_index("model")["n_params"].items():
        if pd.notna(n):
            n = float(n)
            out[m] = f"{n / 1e9:.3g}B params" if n >= 1e9 else f"{n / 1e6:.3g}M params"
    return out


def scores_html(scores: pd.DataFrame, title: str = "Scores") -> str:
    """Per family: models x quant configurations of mean zero-shot accuracy, perplexity and
    model size (total bits / 8); then every task metric in one wide table (collapsed)."""
    div = diverged_runs(scores)
    diverged = set(zip(div["model"], div["quant"], strict=True))
    ppl = perplexity_target(list(scores["target"].unique()))
    parts = [
        "<p>Best value of each model in bold (highest accuracy, lowest perplexity); "
        "<span class='diverged'>diverged</span> runs are results, never averaged. Sizes are "
        "total model bits / 8 in binary units.</p>"
    ]
    for fam, g in scores.groupby("family", sort=True):
        models = list(
            g.drop_duplicates("model").sort_values(["n_params", "model"])["model"]
            if "n_params" in g
            else sorted(g["model"].unique())
        )
        quants = _spec_order(g)
        params = _param_labels(g)
        parts.append(f"<h2>{_e(fam)}</h2>")
        acc = g[g["target"] == ACCURACY_TARGET]
        if len(acc):
            parts.append(f"<h3>mean zero-shot accuracy (<code>{ACCURACY_TARGET}</code>)</h3>")
            parts.append(_pivot(acc, models, quants, lambda v: f"{v:.4f}", False, diverged, params))
        if ppl is not None and (g["target"] == ppl).any():
            parts.append(f"<h3>perplexity (<code>{_e(ppl)}</code>, lower is better)</h3>")
            parts.append(
                _pivot(
                    g[g["target"] == ppl], models, quants, lambda v: f"{v:.4g}", True, set(), params
                )
            )
        size = g.drop_duplicates(["model", "quant"]).assign(value=lambda x: x["total_bits"])
        parts.append("<h3>model size (total bits / 8)</h3>")
        parts.append(
            _pivot(size, models, quants, lambda v: format_bytes(v / 8), None, set(), params)
        )
    detail = scores[scores["task"] != "mean_zeroshot"] if "task" in scores else scores
    if len(detail):
        wide = detail.pivot_table(
            index=["family", "model", "quant"], columns="target", values="value", aggfunc="first"
        )
        rows = [
            [*map(_e, idx), *("" if pd.isna(v) else _e(f"{v:.4g}") for v in r)]
            for idx, r in zip(wide.index, wide.to_numpy(), strict=True)
        ]
        parts.append(
            f"<details><summary>every task metric ({len(wide)} runs)</summary>"
            + html_table(
                ["family", "model", "quant", *map(_e, wide.columns)],
                rows,
                [False] * 3 + [True] * len(wide.columns),
            )
            + "</details>"
        )
    return page(title, "\n".join(parts))


def runs_html(runs: pd.DataFrame, title: str = "Runs") -> str:
    """Per (model, quant): tasks, documents, tokens, wall time, throughput, device and batch
    size; then the software versions that produced the run table."""
    if runs.empty:
        return page(title, "<p>no runs</p>")
    keys = ["family", "model", "quant"]
    agg = runs.groupby(keys, sort=True).agg(
        tasks=("task", lambda t: ", ".join(sorted(t))),
        docs=("n_docs", "sum"),
        tokens=("n_tokens", "sum"),
        wall=("wall_time_s", "sum"),
        flops=("flops", "sum"),
    )
    for col in ("device", "batch_size", "eval_dtype"):
        if col in runs:
            agg[col] = runs.groupby(keys, sort=True)[col].first()
    header = ["family", "model", "quant", "tasks", "documents", "tokens", "wall time (s)"]
    header += ["TFLOP/s", *[c for c in ("device", "batch_size", "eval_dtype") if c in agg]]
    rows = []
    for idx, r in agg.iterrows():
        rate = r["flops"] / r["wall"] / 1e12 if r["wall"] > 0 else float("nan")
        extra = [_e(r[c]) for c in ("device", "batch_size", "eval_dtype") if c in agg]
        rows.append(
            [
                *map(_e, idx),
                _e(r["tasks"]),
                f"{int(r['docs'])}",
                f"{int(r['tokens'])}",
                f"{r['wall']:.1f}",
                "" if not np.isfinite(rate) else f"{rate:.3g}",
                *extra,
            ]
        )
    numeric = [False, False, False, False, True, True, True, True] + [False] * (len(header) - 8)
    total = float(agg["wall"].sum())
    parts = [
        f"<p>{len(agg)} runs ({len(runs)} task evaluations), {total / 3600:.2f} hours of "
        "evaluation wall time in total.</p>",
        html_table(header, rows, numeric),
    ]
    versions = [c for c in runs.columns if c.endswith("_version")]
    if versions:
        parts.append("<h2>Software versions</h2>")
        vrows = [
            [_e(c.removesuffix("_version")), _e(", ".join(sorted(map(str, runs[c].unique()))))]
            for c in versions
        ]
        parts.append(html_table(["package", "versions in these runs"], vrows))
    return page(title, "\n".join(parts))


def write_tables_html(
    scores: pd.DataFrame, runs: pd.DataFrame, scores_path: str | Path, runs_path: str | Path
) -> None:
    """Write ``scores.html`` and ``runs.html`` (atomically)."""
    write_text(scores_html(scores), scores_path)
    write_text(runs_html(runs), runs_path)
