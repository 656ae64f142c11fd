"""Write the benchmark's ``results.json``, PNG plots, ``report.md`` and a self-contained
``report.html`` (plots embedded as data URIs). Every figure printed comes from ``results``."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from mordasr.runtime.atomic import atomic_write

PLOTS = ("latency", "resolution", "buckets", "memory")


def _plot(results: dict, out: Path) -> list[str]:
    from mordasr.lazy import import_optional

    import_optional("matplotlib", "the benchmark plots").use("Agg")
    plt = import_optional("matplotlib.pyplot", "the benchmark plots")

    written = []
    rows = results["variants"]
    labels = [f"{r['variant']}\n{r['precision']}" for r in rows]

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(labels, [r["latency"]["p50_ms"] for r in rows], color="#4477aa")
    ax.errorbar(labels, [r["latency"]["p50_ms"] for r in rows],
                yerr=[[0] * len(rows), [r["latency"]["p95_ms"] - r["latency"]["p50_ms"] for r in rows]],
                fmt="none", ecolor="black", capsize=3)
    ax.set_ylabel("end-to-end latency, ms (p50, bar to p95)")
    ax.set_title(f"{results['preset']}: {results['config']['lr_size']}px LR -> "
                 f"{results['config']['lr_size'] * results['config']['scale']}px")
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    written.append("latency.png")

    if results.get("resolution"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in dict.fromkeys(r["variant"] for r in results["resolution"]):
            pts = [r for r in results["resolution"] if r["variant"] == name]
            ax.plot([p["out_side"] for p in pts], [p["p50_ms"] for p in pts], marker="o", label=name)
        ax.set_xlabel("output side, px")
        ax.set_ylabel("latency p50, ms")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "resolution.png", dpi=110)
        written.append("resolution.png")

    if results.get("bucket_sweep"):
        fig, ax = plt.subplots(figsize=(6, 4))
        sweep = results["bucket_sweep"]
        ax.plot([r["buckets"] for r in sweep], [r["psnr_vs_continuous"] for r in sweep], marker="o")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("folded buckets")
        ax.set_ylabel("PSNR vs continuous routing, dB")
        fig.tight_layout()
        fig.savefig(out / "buckets.png", dpi=110)
        written.append("buckets.png")

    measured = [r for r in rows if r.get("memory") and "peak_rss_mib" in r["memory"]]
    if measured:
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar([f"{r['variant']}\n{r['precision']}" for r in measured],
               [r["memory"]["peak_rss_mib"] for r in measured], color="#aa7744")
        ax.set_ylabel("peak host RSS, MiB")
        fig.tight_layout()
        fig.savefig(out / "memory.png", dpi=110)
        written.append("memory.png")
    plt.close("all")
    return written


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}"


def _memory_cell(memory: dict | None) -> str:
    if not memory:
        return "n/a"
    if "peak_rss_mib" in memory:
        return _fmt(memory["peak_rss_mib"], 0)
    return f"{memory['peak_gpu_mib']:.0f} (GPU)"


def teacher_speed_lines(t: dict) -> list[str]:
    """The student bundle and its teacher on one photograph, alternating in fresh processes."""
    ratio = t["teacher_over_student"]
    rows = [f"| {label} | {t[side]['seconds_per_megapixel']:.2f} "
            f"({t[side]['seconds_per_megapixel_range'][0]:.2f}-{t[side]['seconds_per_megapixel_range'][1]:.2f}) | "
            f"{t[side]['peak_rss_mib']:.0f} |"
            for side, label in (("student", f"{t['bundle']} on {t['base']} ({t['backend']})"),
                                ("teacher", f"teacher {t['teacher_name']} (ncnn/ONNX Runtime, CPU)"))]
    return [f"## Student and teacher on one photograph ({t['rounds']} alternating rounds, fresh processes)", "",
            f"{t['photo']}: {t['input'][0]}x{t['input'][1]} -> {t['output'][0]}x{t['output'][1]}.", "",
            "| restorer | s per output MP (range) | peak RSS MiB |", "|---|---|---|", *rows, "",
            f"The teacher takes **{ratio['ratio']:.2f}x** the student's time (95 % interval "
            f"{ratio['ci95'][0]:.2f}-{ratio['ci95'][1]:.2f}x; per round "
            + ", ".join(f"{r:.2f}" for r in ratio["per_round"]) + ")."]


def quality_table(quality: dict) -> list[str]:
    """Y-PSNR gain over bicubic per recipe (rows) and variant (columns), best variant in bold."""
    summary = quality["summary"]
    variants = [t["label"] for t in quality["targets"] if t["kind"] != "bicubic"]
    recipes = list(dict.fromkeys(s["recipe"] for s in summary))
    cell = {(s["recipe"], s["target"]): s for s in summary}
    lines = [f"## Quality per recipe and severity ({len(quality['images'])} held-out photographs)", "",
             "Y-PSNR gain over bicubic in dB (BT.601 Y, 4-pixel border, 8-bit outputs); worst single "
             "image in brackets; bicubic's own Y-PSNR in the second column.", "",
             "| recipe | bicubic dB | " + " | ".join(variants) + " |", "|---" * (2 + len(variants)) + "|"]
    for recipe in recipes:
        gains = {v: cell[(recipe, v)]["gain_y"] for v in variants if (recipe, v) in cell}
        best = max(gains, key=gains.get) if gains else None
        cells = []
        for v in variants:
            if (recipe, v) not in cell:
                cells.append("")
                continue
            text = f"{gains[v]:+.2f} ({cell[(recipe, v)]['worst_gain_y']:+.2f})"
            cells.append(f"**{text}**" if v == best else text)
        lines.append(f"| {recipe} | {cell[(recipe, 'bicubic')]['psnr_y']:.2f} | " + " | ".join(cells) + " |")
    return lines


def _provenance(config: dict) -> str:
    """Where each adapter came from: trained by this run, or a given checkpoint, and its steps."""
    parts = []
    for kind, p in config.get("adapters", {}).items():
        origin = f"from {p['checkpoint']}" if p["checkpoint"] else "trained by this run"
        steps = "random weights" if p["random_weights"] else f"{p['steps']} steps"
        parts.append(f"{kind} {steps}, {origin}")
    return "; ".join(parts) or "none"


def markdown(results: dict, plots: list[str]) -> str:
    m = results["machine"]
    lines = [f"# mordasr benchmark: {results['preset']} preset", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {m['os']}; "
             f"GPU: {m.get('gpu') or 'none'}; onnxruntime {m['onnxruntime']}, torch {m['torch']}, "
             f"tensorrt {m.get('tensorrt') or 'not installed'}.",
             f"Backend: {results['backend']}. "
             f"Image: {results['config']['lr_size']} px LR, x{results['config']['scale']}. "
             f"{results['config']['iterations']} timed runs after {results['config']['warmup']} warm-up runs. "
             f"Total adapter rank {results['config']['total_rank']}; adapters: {_provenance(results['config'])}.",
             ""]
    if results.get("random_weights"):
        lines += ["**Random weights** (sd21 without local weights): latency and memory are real, "
                  "fidelity figures mean nothing.", ""]
    lines += ["## Variants", "",
              "| variant | precision | p50 ms | p95 ms | p99 ms | img/s | overhead | peak RSS MiB | size MiB "
              "| export s "
              "| PSNR vs FP32 torch | SSIM vs FP32 torch | PSNR vs HR | SSIM vs HR |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["variants"]:
        lat = r["latency"]
        overhead = f"{100 * r['runtime_overhead']:.1f} %" if "runtime_overhead" in r else "n/a"
        lines.append(f"| {r['variant']} | {r['precision']} | {_fmt(lat['p50_ms'])} | {_fmt(lat['p95_ms'])} | "
                     f"{_fmt(lat['p99_ms'])} | {_fmt(r['throughput_img_per_s'])} | {overhead} | "
                     f"{_memory_cell(r['memory'])} | "
                     f"{_fmt(r['size']['graphs_mib']) if r['size'] else 'n/a'} | {_fmt(r['export_seconds'], 1)} | "
                     f"{_fmt(r['psnr_vs_fp32_torch'])} | {_fmt(r['ssim_vs_fp32_torch'], 4)} | "
                     f"{_fmt(r['psnr_vs_hr'])} | {_fmt(r['ssim_vs_hr'], 4)} |")
    adapted = [r for r in results["variants"] if r.get("adapter_params")]
    if adapted:
        lines += ["", "## Adapters compared (same base, same training budget)", "",
                  "| variant | precision | adapter parameters | PSNR vs HR | SSIM vs HR | p50 ms |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['precision']} | {r['adapter_params']:,} | {_fmt(r['psnr_vs_hr'])} | "
                  f"{_fmt(r['ssim_vs_hr'], 4)} | {_fmt(r['latency']['p50_ms'])} |" for r in adapted]
    lines += ["", "## Components (raw session time)", "",
              "| variant | precision | component | p50 ms | p95 ms | GFLOP | GFLOP/s | fraction of peak |",
              "|---|---|---|---|---|---|---|---|"]
    for r in results["variants"]:
        for name, c in (r["components"] or {}).items():
            lines.append(f"| {r['variant']} | {r['precision']} | {name} | {_fmt(c['p50_ms'], 3)} | "
                         f"{_fmt(c['p95_ms'], 3)} | {_fmt(c['gflops'], 3)} | {_fmt(c['achieved_gflops_per_s'], 1)} | "
                         f"{_fmt(c.get('fraction_of_peak'), 3)} |")
    if results.get("bucket_sweep"):
        lines += ["", "## Folded buckets vs continuous routing (PyTorch)", "",
                  "| buckets | PSNR vs continuous | PSNR vs HR |", "|---|---|---|"]
        lines += [f"| {r['buckets']} | {_fmt(r['psnr_vs_continuous'])} | {_fmt(r['psnr_vs_hr'])} |"
                  for r in results["bucket_sweep"]]
    if results.get("photo_speed"):
        p = results["photo_speed"]
        lines += ["", f"## A photograph end to end (`mordasr-run` defaults, {p['bundle']}, {p['backend']})", "",
                  f"{p['photo']}: {p['input'][0]}x{p['input'][1]} -> {p['output'][0]}x{p['output'][1]} "
                  f"({p['output_megapixels']:.1f} MP): {p['seconds_per_megapixel']:.2f} s per output megapixel "
                  f"(runs {p['seconds_per_megapixel_range'][0]:.2f}-{p['seconds_per_megapixel_range'][1]:.2f}), "
                  f"peak RSS {p['peak_rss_mib']:.0f} MiB, {p['runs']} fresh processes."]
    if results.get("teacher_speed"):
        lines += ["", *teacher_speed_lines(results["teacher_speed"])]
    if results.get("quality"):
        lines += ["", *quality_table(results["quality"])]
    if results.get("bucket_switch"):
        b = results["bucket_switch"]
        lines += ["", f"## Bucket switch ({b['bundle']}, {b['backend']}, p50 of {b['runs']} runs)", "",
                  "| bucket switch | first image ms | bucket fixed ms | buckets alternating ms | switch cost ms |",
                  "|---|---|---|---|---|"]
        lines += [f"| {s} | {_fmt(b[f'{s}_first_ms'])} | {_fmt(b[f'{s}_fixed_p50_ms'])} | "
                  f"{_fmt(b[f'{s}_alternating_p50_ms'])} | {_fmt(b[f'{s}_switch_ms'])} |" for s in ("graphs", "refit")]
        lines += ["", f"Refittable vs fixed graphs, latency with the bucket fixed: "
                      f"{b['refittable_vs_fixed_latency']:.3f}x."]
    if results.get("targets"):
        lines += ["", "## Targets (measured, not asserted)", "",
                  "Latency ratios come from interleaved rounds (every variant timed in every round); a "
                  "target counts as met only when the upper end of the 95 % interval is under the limit.", "",
                  "| target | measured | 95 % interval | limit | met |", "|---|---|---|---|---|"]
        for t in results["targets"]:
            interval = f"{t['ci95'][0]:.3f}-{t['ci95'][1]:.3f}x ({t['rounds']} rounds)" if "ci95" in t else ""
            lines.append(f"| {t['target']} | {t['ratio']:.3f}x | {interval} | {t['limit']:.2f}x | "
                         f"{'yes' if t['met'] else 'no'} |")
    if results.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    lines += [""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _crop_grid(crops: dict) -> list[str]:
    """One row per recipe: the same HR crop as HR, bicubic and each variant/precision restored it."""
    parts = [f"<h2>{html.escape(crops['title'])}</h2>", "<table>"]
    for recipe, row in crops["rows"].items():
        cells = "".join(f"<td><img alt='{html.escape(label)}' src='data:image/png;base64,{data}'>"
                        f"<br>{html.escape(label)}</td>" for label, data in row.items())
        parts.append(f"<tr><th>{html.escape(recipe)}</th>{cells}</tr>")
    return parts + ["</table>"]


def _html(md: str, plots: list[str], out: Path, crops: dict | None = None) -> str:
    """A self-contained page: the Markdown tables as HTML tables, crops and plots inlined."""
    body, in_table = [], False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            if not in_table:
                body.append("<table>")
                in_table = True
                body.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>")
            else:
                body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("!["):
            continue
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    if crops:
        body += _crop_grid(crops)
    for p in plots:
        data = base64.b64encode((out / p).read_bytes()).decode()
        body.append(f'<p><img alt="{p}" src="data:image/png;base64,{data}"></p>')
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}")
    head = f"<head><meta charset='utf-8'><style>{style}</style></head>"
    return f"<!doctype html><html>{head}<body>{''.join(body)}</body></html>\n"


def write_report(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    plots = _plot(results, out)
    md = markdown(results, plots)
    data = {k: v for k, v in results.items() if k != "crops"}  # the crops live in report.html only
    files = {"results.json": json.dumps(data, indent=2) + "\n", "report.md": md,
             "report.html": _html(md, plots, out, results.get("crops"))}
    for name, text in files.items():
        atomic_write(out / name, text)
    return [out / n for n in files] + [out / p for p in plots]
