"""``mordasr-study``: MoR against dense LoRA (and AdaptIR) on a base that leaves the adapters
something to learn.

The paper's base (SD 2.1) never learned restoration; its adapters learn all of it. The setting at
CPU scale: a base whose autoencoder is retrained to reconstruct and whose UNet is trained anew on
clean bicubic inputs only, so blur, noise, JPEG and Real-ESRGAN's chain are left to the adapters.
Then, for each adapter kind and seed, the same steps on the same data (a heavy mix), with the same
number of trainable parameters (AdaptIR's width is set to match dense LoRA's count).

Measured on held-out photographs (``--eval-data``; centre crops), per degradation family and
severity: Y-PSNR of every run, the paired difference MoR - LoRA over images x seeds with its 95 %
confidence interval (Student's t), adapted - base on the heavy set, the mean gate of each routed
rank per family and layer group (a heatmap), folded 1/2/4/8/16 buckets against continuous gates,
and the UNet latency of folded and gated MoR engines against merged dense LoRA (interleaved rounds).
Beside them: MoR ablations on the first seed (top-k, zero slots, balance loss, shared/routed split;
one may be confirmed on every seed) and the shipped ``tiny`` base, trained end to end on the
degradation mix, as the measure of how much room the heavy set holds for this architecture.

Every phase keeps what it made under ``--work`` and skips it on a second run, so a killed study
resumes; the training commands it runs are printed, and the report names the command that
reproduces the whole study.
"""

from __future__ import annotations

import base64
import json
import logging
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mordasr.benchmarks.recipes import MIXTURES, RECIPES
from mordasr.errors import MordasrError

log = logging.getLogger(__name__)

FAMILIES = {
    "clean": ("bicubic-x4",),
    "noise": ("noise-5", "noise-10", "noise-20"),
    "blur": ("blur-0.5", "blur-1.5", "blur-2.5"),
    "jpeg": ("jpeg-30", "jpeg-60", "jpeg-90"),
    "realesrgan": ("realesrgan-x4",),
    "mixture of two": MIXTURES,
    "mixed-x4": ("mixed-x4",),
}
# The heavy set on which adapted - base must reach +0.5 dB for the study to count.
HEAVY = ("mixed-x4", "realesrgan-x4", *MIXTURES, "noise-20", "blur-2.5", "jpeg-30")
MIN_GAIN_DB = 0.5
ADAPTER_MIX = "clean=0.1,synthetic=0.45,compound=0.15,realesrgan=0.3"
BUCKET_COUNTS = (1, 2, 4, 8, 16)
# The shipped tiny base: every weight trained end to end, long, on the degradation mix; how much
# room the heavy set holds for this architecture, beside what the adapters took of it.
REFERENCE = "tiny"
# Ablation -> (what it changes, its mordasr-train adapters arguments): MoR on the first seed.
ABLATIONS = {
    "mor-top4": ("top-k 4 instead of 2: more routed ranks per input", ["--top-k", "4"]),
    "mor-no-zero": ("no zero slots: every input takes top-k routed ranks", ["--zero-slots", "0"]),
    "mor-no-balance": ("no degradation-aware balance loss", ["--balance-weight", "0"]),
    "mor-all-routed": ("no shared ranks: all 10 routed", ["--r-shared", "0", "--r-routed", "10"]),
}


@dataclass
class StudyConfig:
    out: Path
    work: Path
    data: Path
    eval_data: Path
    eval_limit: int = 24
    eval_crop: int = 256  # HR side of each held-out centre crop
    base_vae_steps: int = 1000
    base_sr_steps: int = 1500
    steps: int = 1000
    seeds: tuple[int, ...] = (0, 1, 2)
    adapters: tuple[str, ...] = ("mor", "lora", "adaptir")
    ablations: tuple[str, ...] = tuple(ABLATIONS)
    confirm: str | None = None  # an ablation trained on every seed, compared like MoR
    batch: int = 8
    crop: int = 64
    precision: str = "bf16"
    rounds: int = 12
    notes: list[str] = field(default_factory=list)

    def validate(self) -> None:
        if "mor" not in self.adapters or "lora" not in self.adapters:
            raise MordasrError("the study compares mor with lora: --adapters must name both")
        unknown = sorted(set(self.ablations) - set(ABLATIONS))
        if unknown:
            raise MordasrError(f"unknown ablation {unknown[0]!r}; choose from {', '.join(ABLATIONS)}")
        if self.confirm is not None and self.confirm not in self.ablations:
            raise MordasrError(f"--confirm {self.confirm}: not among the --ablations ({', '.join(self.ablations)})")
        if len(self.seeds) < 2:
            raise MordasrError("give at least 2 --seeds: the confidence intervals are over images x seeds")
        for folder, option in ((self.data, "--data"), (self.eval_data, "--eval-data")):
            if not Path(folder).is_dir():
                raise MordasrError(f"{option} {folder} is not a folder")
        if Path(self.data).resolve() == Path(self.eval_data).resolve():
            raise MordasrError("--eval-data must be held out: it is the --data folder")


def _train(args: list[str], progress: Callable[[str], None]) -> None:
    command = [sys.executable, "-m", "mordasr.training.cli", *args]
    progress("running: mordasr-train " + shlex.join(args))
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise MordasrError(f"mordasr-train {args[0]} failed: {last}")


def train_base(cfg: StudyConfig, progress: Callable[[str], None]) -> Path:
    """The clean-only base: the shipped tiny base's estimator, its autoencoder retrained to
    reconstruct (forgetting what it learned of restoration), and a new UNet trained on clean
    bicubic inputs."""
    from mordasr.model.io import base_path

    out = cfg.work / "base"
    if (out / ".study-done").is_file():
        return out
    _train(["base", "-o", str(out), "--data", str(cfg.data), "--from", str(base_path("tiny")),
            "--stages", "vae,sr", "--new-unet", "--sr-mix", "clean=1", "--vae-steps", str(cfg.base_vae_steps),
            "--sr-steps", str(cfg.base_sr_steps), "--seed", "0", "-q"], progress)
    (out / ".study-done").write_text("ok\n")
    return out


def adapter_parameters(base: Path, kind: str) -> int:
    from mordasr.model.io import load_checkpoint

    model, _ = load_checkpoint(base, adapter=kind)
    return sum(p.numel() for p in model.adapter_parameters())


def matching_adaptir_hidden(base: Path, target: int) -> tuple[int, int]:
    """(hidden width, trainable parameters) of the AdaptIR adapters whose count comes nearest
    ``target``: one AdaptIR beside each transformer block of the base's UNet, and its parameters
    grow with the width, so a bisection finds it."""
    from diffusers.models.attention import BasicTransformerBlock

    from mordasr.model.adapters.adaptir import AdaptIR
    from mordasr.model.io import load_checkpoint

    model, _ = load_checkpoint(base, add_adapters=False)
    dims = [m.dim for m in model.unet.modules() if isinstance(m, BasicTransformerBlock)]

    def count(hidden: int) -> int:
        return sum(p.numel() for d in dims for p in AdaptIR(d, hidden=hidden).parameters())

    low, high = 8, 16
    while count(high) < target:
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if count(mid) < target else (low, mid)
    best = min((low, high), key=lambda h: abs(count(h) - target))
    return best, count(best)


def trainable_parameters(checkpoint: Path) -> int:
    from mordasr.model.io import load_checkpoint

    model, _ = load_checkpoint(checkpoint, add_adapters=False)
    return sum(p.numel() for p in model.adapter_parameters())


def _train_adapters(cfg: StudyConfig, base: Path, out: Path, kind: str, seed: int, extra: list[str],
                    progress: Callable[[str], None]) -> None:
    if (out / "config.json").is_file():
        return
    _train(["adapters", "-o", str(out), "--base", str(base), "--adapter", kind, *extra,
            "--steps", str(cfg.steps), "--batch", str(cfg.batch), "--crop", str(cfg.crop),
            "--data", str(cfg.data), "--mix", ADAPTER_MIX, "--precision", cfg.precision,
            "--seed", str(seed), "-q"], progress)


def train_runs(cfg: StudyConfig, base: Path, progress: Callable[[str], None]) -> tuple[dict, dict]:
    """({(name, seed): checkpoint}, {name: trainable parameters}) for every adapter kind and seed,
    then every ablation on the first seed; runs already trained are kept."""
    params = {kind: adapter_parameters(base, kind) for kind in cfg.adapters if kind != "adaptir"}
    hidden = None
    if "adaptir" in cfg.adapters:
        hidden, params["adaptir"] = matching_adaptir_hidden(base, params["lora"])
    spread = max(params.values()) / min(params.values()) - 1
    if spread > 0.05:
        cfg.notes.append(f"trainable parameters differ by {spread:.1%}: {params}")
    runs = {}
    for seed in cfg.seeds:
        for kind in cfg.adapters:
            out = cfg.work / f"{kind}-s{seed}"
            extra = ["--adaptir-hidden", str(hidden)] if kind == "adaptir" else []
            _train_adapters(cfg, base, out, kind, seed, extra, progress)
            runs[(kind, seed)] = out
    for name in cfg.ablations:
        for seed in cfg.seeds if name == cfg.confirm else cfg.seeds[:1]:
            out = cfg.work / f"{name}-s{seed}"
            _train_adapters(cfg, base, out, "mor", seed, ABLATIONS[name][1], progress)
            runs[(name, seed)] = out
        params[name] = trainable_parameters(out)
    return runs, params


def centre_crops(cfg: StudyConfig) -> list[tuple[str, np.ndarray]]:
    from mordasr.benchmarks.evaluate import load_hr

    crops = []
    for name, hr in load_hr(cfg.eval_data, cfg.eval_limit):
        side = min(cfg.eval_crop, hr.shape[0] // 4 * 4, hr.shape[1] // 4 * 4)
        top, left = (hr.shape[0] - side) // 2, (hr.shape[1] - side) // 2
        crops.append((name, np.ascontiguousarray(hr[top: top + side, left: left + side])))
    return crops


def evaluate_runs(cfg: StudyConfig, base: Path, runs: dict, images, progress) -> list[dict]:
    """Y-PSNR against HR of the base, the reference and every run, per recipe and image. Each
    target's rows are cached in ``--work/evaluation/``: a second run of the study, or one with more
    runs, evaluates only what it has not evaluated yet."""
    from mordasr.benchmarks.evaluate import evaluate, resolve_target
    from mordasr.model.io import base_path
    from mordasr.runtime.atomic import atomic_write

    recipes = [r for family in FAMILIES.values() for r in family]
    names = [n for n, _ in images]
    specs = {"base": base, REFERENCE: base_path(REFERENCE)}
    specs.update({f"{name}-s{seed}": path for (name, seed), path in runs.items()})
    cache = cfg.work / "evaluation"
    cache.mkdir(exist_ok=True)
    rows = []
    for label, path in specs.items():
        file, checkpoint = cache / f"{label}.json", str(Path(path).resolve())
        if file.is_file():
            found = json.loads(file.read_text())
            if found.get("checkpoint") == checkpoint and found["recipes"] == recipes and found["images"] == names:
                rows += found["rows"]
                continue
        progress(f"evaluating {label} on {len(images)} held-out crops x {len(recipes)} recipes")
        result = evaluate([resolve_target(f"{label}={path}")], images, recipes)
        found_rows = [{k: r[k] for k in ("recipe", "image", "target", "psnr_y")} for r in result["per_image"]
                      if r["target"] == label or (label == "base" and r["target"] == "bicubic")]
        atomic_write(file, json.dumps({"checkpoint": checkpoint, "recipes": recipes, "images": names,
                                       "rows": found_rows}) + "\n")
        rows += found_rows
    return rows


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of a - b with its 95 % confidence interval (Student's t over the pairs)."""
    from scipy import stats

    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("inf")
    mean = float(d.mean())
    verdict = "win" if mean - half > 0 else "lose" if mean + half < 0 else "tie"
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": len(d), "verdict": verdict}


def _label(name: str, seed: int) -> str:
    return name if name in ("base", REFERENCE) else f"{name}-s{seed}"


def compare(rows: list[dict], seeds, a: str, b: str, recipes) -> dict:
    """Paired ``a`` - ``b`` over images x seeds on ``recipes`` (``base`` and the reference are
    the same model for every seed)."""
    psnr = {(r["target"], r["recipe"], r["image"]): r["psnr_y"] for r in rows}
    images = sorted({r["image"] for r in rows})
    xs, ys = [], []
    for seed in seeds:
        for recipe in recipes:
            for image in images:
                xs.append(psnr[(_label(a, seed), recipe, image)])
                ys.append(psnr[(_label(b, seed), recipe, image)])
    return paired(xs, ys)


def tables(cfg: StudyConfig, rows: list[dict]) -> dict:
    mean: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        mean.setdefault((r["target"], r["recipe"]), []).append(r["psnr_y"])
    others = [kind for kind in cfg.adapters if kind != "mor"]
    per_recipe = []
    for family, recipes in FAMILIES.items():
        for recipe in recipes:
            psnr_y = {label: float(np.mean(v)) for (label, rec), v in mean.items() if rec == recipe}
            per_recipe.append({"family": family, "recipe": recipe, "psnr_y": psnr_y,
                               **{f"mor_minus_{k}": compare(rows, cfg.seeds, "mor", k, [recipe]) for k in others}})
    per_family = [{"family": family,
                   **{f"mor_minus_{k}": compare(rows, cfg.seeds, "mor", k, recipes) for k in others},
                   "adapted_minus_base": {k: compare(rows, cfg.seeds, k, "base", recipes) for k in cfg.adapters}}
                  for family, recipes in FAMILIES.items()]
    gains = {kind: compare(rows, cfg.seeds, kind, "base", HEAVY) for kind in cfg.adapters}
    first = cfg.seeds[:1]
    ablations = [{"name": name, "change": ABLATIONS[name][0],
                  "minus_mor": compare(rows, first, name, "mor", HEAVY),
                  "minus_lora": compare(rows, first, name, "lora", HEAVY),
                  "minus_base": compare(rows, first, name, "base", HEAVY)} for name in cfg.ablations]
    confirmed = None
    if cfg.confirm:
        confirmed = {"name": cfg.confirm, "change": ABLATIONS[cfg.confirm][0],
                     "heavy": {b: compare(rows, cfg.seeds, cfg.confirm, b, HEAVY) for b in ("base", "mor", "lora")},
                     "per_family": [{"family": family, "minus_lora": compare(rows, cfg.seeds, cfg.confirm, "lora",
                                                                             recipes)}
                                    for family, recipes in FAMILIES.items()]}
    return {"per_recipe": per_recipe, "per_family": per_family, "adapted_minus_base_heavy": gains,
            "confirmed": confirmed,
            "reference_minus_base_heavy": compare(rows, first, REFERENCE, "base", HEAVY),
            "ablations": ablations,
            "study_counts": all(g["mean"] >= MIN_GAIN_DB for g in gains.values())}


def layer_group(name: str) -> str:
    for key, group in (("vae.", "encoder"), ("down_blocks", "UNet down"), ("mid_block", "UNet mid"),
                       ("up_blocks", "UNet up")):
        if key in name:
            return group
    return "UNet in/out"


def routing_heatmap(checkpoint: Path, images, out: Path) -> dict:
    """Mean gate of each routed rank, per degradation family (rows) and layer group (panels)."""
    import torch

    from mordasr.model.adapters.mor import MoRLayer
    from mordasr.model.io import load_checkpoint

    model, _ = load_checkpoint(checkpoint, add_adapters=False)
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoRLayer)]
    groups = list(dict.fromkeys(layer_group(name) for name, _ in layers))
    gates: dict[str, dict[str, list[float]]] = {}
    for family, recipes in FAMILIES.items():
        lrs = [RECIPES[recipe].degrade(hr, name) for recipe in recipes for name, hr in images]
        with torch.no_grad():
            scores = torch.cat([model.estimate(torch.from_numpy(lr.transpose(2, 0, 1)[None].copy()))
                                for lr in lrs])
            per_group: dict[str, list[np.ndarray]] = {g: [] for g in groups}
            for name, layer in layers:
                per_group[layer_group(name)].append(layer.gate(scores)[:, layer.r_shared:].mean(0).numpy())
        gates[family] = {g: np.mean(v, axis=0).tolist() for g, v in per_group.items()}
    _plot_heatmap(gates, groups, out)
    return {"groups": groups, "families": list(FAMILIES), "mean_gate": gates}


def _plot_heatmap(gates: dict, groups: list[str], out: Path) -> None:
    from mordasr.lazy import import_optional

    import_optional("matplotlib", "the study's plots", "matplotlib").use("Agg")
    import matplotlib.pyplot as plt

    families = list(gates)
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.6), squeeze=False)
    for ax, group in zip(axes[0], groups):
        grid = np.array([gates[f][group] for f in families])
        image = ax.imshow(grid, vmin=0, vmax=max(0.5, float(grid.max())), cmap="viridis", aspect="auto")
        ax.set_title(group)
        ax.set_xticks(range(grid.shape[1]))
        ax.set_xlabel("routed rank")
        ax.set_yticks(range(len(families)))
        ax.set_yticklabels(families if ax is axes[0][0] else [""] * len(families))
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="mean gate")
    fig.suptitle("MoR: mean gate of each routed rank per degradation family")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def bucket_curve(checkpoint: Path, images, out: Path, seed: int = 0) -> list[dict]:
    """Folded 1..16 buckets against continuous gates (PyTorch), on the heavy set's crops."""
    from mordasr.benchmarks.runner import bucket_sweep
    from mordasr.lazy import import_optional
    from mordasr.model.io import load_checkpoint

    model, _ = load_checkpoint(checkpoint, add_adapters=False)
    pairs = [(RECIPES[recipe].degrade(hr, name), hr) for recipe in ("mixed-x4", "realesrgan-x4", *MIXTURES)
             for name, hr in images[:6]]
    rows = bucket_sweep(model, pairs, BUCKET_COUNTS, seed)
    import_optional("matplotlib", "the study's plots", "matplotlib").use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot([r["buckets"] for r in rows], [r["psnr_vs_continuous"] for r in rows], "o-")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("folded buckets")
    ax.set_ylabel("PSNR vs continuous gates (dB)")
    ax.set_title("Folding the routing into K buckets")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return rows


def latency(cfg: StudyConfig, mor: Path, lora: Path, lr_side: int = 64) -> list[dict]:
    """UNet latency of folded (4 buckets) and gated MoR against merged dense LoRA: ratios from
    interleaved rounds (benchmarks/runner.py)."""
    from mordasr.benchmarks.runner import interleaved_ratios
    from mordasr.export.buckets import default_buckets
    from mordasr.export.bundle import export_bundle
    from mordasr.model.io import load_checkpoint
    from mordasr.runtime import Restorer

    lr = np.random.default_rng(0).uniform(0, 1, (lr_side, lr_side, 3)).astype(np.float32)
    calls = {}
    for variant, checkpoint, mode, buckets in (("mor-folded", mor, "folded", 4), ("mor-gated", mor, "gated", 1),
                                               ("dense-lora", lora, "dense-lora", 1)):
        model, _ = load_checkpoint(checkpoint, add_adapters=False)
        bundle = cfg.work / "bundles" / variant
        export_bundle(model, bundle, mode, default_buckets(model, buckets), force=True)
        restorer = Restorer(bundle, threads=2)
        feeds = {}
        restorer.tap = lambda graph, f, _out, feeds=feeds: feeds.setdefault(graph.component, (graph, dict(f)))
        restorer.restore(lr)
        restorer.tap = None
        graph, f = feeds["unet"]
        calls[(variant, "fp32")] = lambda r=restorer, g=graph, f=f: r.backend.run(g, f)
    return interleaved_ratios(calls, cfg.rounds)


def run_study(cfg: StudyConfig, progress: Callable[[str], None] = lambda _m: None) -> dict:
    cfg.validate()
    cfg.work.mkdir(parents=True, exist_ok=True)
    cfg.out.mkdir(parents=True, exist_ok=True)
    base = train_base(cfg, progress)
    runs, params = train_runs(cfg, base, progress)
    images = centre_crops(cfg)
    rows = evaluate_runs(cfg, base, runs, images, progress)
    results = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
               "adapter_mix": ADAPTER_MIX, "trainable_parameters": params, "heavy_recipes": list(HEAVY),
               **tables(cfg, rows)}
    heavy = {seed: np.mean([r["psnr_y"] for r in rows if r["target"] == f"mor-s{seed}" and r["recipe"] in HEAVY])
             for seed in cfg.seeds}
    best = max(heavy, key=heavy.get)
    results["best_mor_seed"] = best
    progress("routing heatmap")
    results["routing"] = routing_heatmap(runs[("mor", best)], images[:8], cfg.out / "heatmap.png")
    progress("bucket-count curve")
    results["bucket_curve"] = bucket_curve(runs[("mor", best)], images, cfg.out / "buckets.png")
    progress("latency: folded and gated MoR against dense LoRA")
    results["latency"] = latency(cfg, runs[("mor", best)], runs[("lora", best)])
    results["notes"] = cfg.notes
    return results


def _ci(c: dict) -> str:
    return f"{c['mean']:+.2f} [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]"


def report_lines(results: dict, command: str) -> list[str]:
    config = results["config"]
    kinds = list(results["adapted_minus_base_heavy"])
    others = [k for k in kinds if k != "mor"]
    params = ", ".join(f"{k} {v:,}" for k, v in results["trainable_parameters"].items())
    gains = results["adapted_minus_base_heavy"]
    lines = ["# MoR against dense LoRA on a clean-only base", "",
             f"Reproduce: `{command}`", "",
             f"Trainable parameters: {params}. Adapter data: `{results['adapter_mix']}`; "
             f"{config['steps']} steps, batch {config['batch']} x {config['crop']} px, seeds {config['seeds']}, "
             f"{config['precision']}. Evaluated on {config['eval_limit']} held-out photographs "
             f"(centre crops of {config['eval_crop']} px). Confidence intervals: 95 %, Student's t over "
             "images x seeds (paired).", "",
             "## Did the adapters have something to learn?", "",
             "Adapted − base, Y-PSNR on the heavy set (" + ", ".join(results["heavy_recipes"]) + "):", ""]
    lines += [f"- {kind}: {_ci(g)} dB" for kind, g in gains.items()]
    lines += [f"- for scale, `{REFERENCE}` (every weight trained end to end on the degradation mix, for several "
              f"thousand steps) − base: {_ci(results['reference_minus_base_heavy'])} dB", "",
              "The study counts: " + ("yes" if results["study_counts"] else
                                      f"**no**: a gain under {MIN_GAIN_DB} dB on the heavy set, so the "
                                      "comparisons below are measured on adapters that learned little"),
              "", "Adapted − base per family (dB, 95 % CI):", "",
              "| family | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    lines += [f"| {f['family']} | " + " | ".join(_ci(f["adapted_minus_base"][k]) for k in kinds) + " |"
              for f in results["per_family"]]
    lines += ["", "## MoR against the others per family", "",
              "| family | " + " | ".join(f"MoR − {k} (dB) [95 % CI] | n | verdict" for k in others) + " |",
              "|---|" + "---|---:|---|" * len(others)]
    for f in results["per_family"]:
        cells = [f"{_ci(f[f'mor_minus_{k}'])} | {f[f'mor_minus_{k}']['n']} | {f[f'mor_minus_{k}']['verdict']}"
                 for k in others]
        lines.append(f"| {f['family']} | " + " | ".join(cells) + " |")
    labels = list(results["per_recipe"][0]["psnr_y"])
    lines += ["", "## Per recipe (Y-PSNR, dB, mean over images and seeds)", "",
              "| recipe | " + " | ".join(labels) + " | MoR − LoRA [95 % CI] | verdict |",
              "|---|" + "---:|" * len(labels) + "---|---|"]
    for r in results["per_recipe"]:
        lines.append(f"| {r['recipe']} | " + " | ".join(f"{r['psnr_y'][k]:.2f}" for k in labels)
                     + f" | {_ci(r['mor_minus_lora'])} | {r['mor_minus_lora']['verdict']} |")
    if results["ablations"]:
        seed = config["seeds"][0]
        lines += ["", f"## Ablations (MoR, seed {seed}, heavy set; 95 % CI over images x recipes)", "",
                  "| ablation | change | trainable | − MoR (dB) | − LoRA (dB) | − base (dB) |",
                  "|---|---|---:|---|---|---|"]
        lines += [f"| {a['name']} | {a['change']} | {results['trainable_parameters'][a['name']]:,} | "
                  f"{_ci(a['minus_mor'])} | {_ci(a['minus_lora'])} | {_ci(a['minus_base'])} |"
                  for a in results["ablations"]]
        one = results["bucket_curve"][0]
        lines += ["", "What the router sees: with the scores held at one vector for every input (the 1-bucket fold "
                  f"below), MoR scores {one['psnr_vs_hr']:.2f} dB against HR on the bucket curve's crops; with "
                  f"per-input gates, {one['continuous_psnr_vs_hr']:.2f} dB."]
    confirmed = results.get("confirmed")
    if confirmed:
        name, heavy = confirmed["name"], confirmed["heavy"]
        lines += ["", f"## {name} on every seed ({confirmed['change']})", "",
                  f"Heavy set: {name} − base {_ci(heavy['base'])} dB, − MoR {_ci(heavy['mor'])} dB, − LoRA "
                  f"{_ci(heavy['lora'])} dB (95 % CI over images x seeds x recipes).", "",
                  f"| family | {name} − LoRA (dB) [95 % CI] | n | verdict |", "|---|---|---:|---|"]
        lines += [f"| {f['family']} | {_ci(f['minus_lora'])} | {f['minus_lora']['n']} | {f['minus_lora']['verdict']} |"
                  for f in confirmed["per_family"]]
    lines += ["", "## Routing", "", "![heatmap](heatmap.png)", "",
              "| buckets | PSNR vs continuous (dB) | PSNR vs HR (dB) |", "|---:|---:|---:|"]
    lines += [f"| {r['buckets']} | {r['psnr_vs_continuous']:.2f} | {r['psnr_vs_hr']:.2f} |"
              for r in results["bucket_curve"]]
    lines += ["", "![buckets](buckets.png)", "", "## UNet latency (ONNX Runtime, CPU, interleaved rounds)", "",
              "| ratio | measured | 95 % interval | limit |", "|---|---:|---|---:|"]
    lines += [f"| {r['target']} | {r['ratio']:.3f}x | [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {r['limit']:.2f}x |"
              for r in results["latency"]]
    if results["notes"]:
        lines += ["", "Notes: " + "; ".join(results["notes"])]
    return lines


def write_report(results: dict, out: Path, command: str) -> list[Path]:
    import html

    from mordasr.runtime.atomic import atomic_write

    lines = report_lines(results, command)
    body, table = [], []
    for line in lines + [""]:
        if line.startswith("|"):
            if not set(line) <= set("|-: "):
                table.append("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>"
                                              for c in line.strip("|").split("|")) + "</tr>")
            continue
        if table:
            body.append("<table>" + "".join(table) + "</table>")
            table = []
        if line.startswith("![") and line.endswith(")"):
            name = line[line.index("(") + 1: -1]
            data = base64.b64encode((out / name).read_bytes()).decode()
            body.append(f'<p><img alt="{name}" src="data:image/png;base64,{data}"></p>')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line:
            body.append(f"<p>{html.escape(line)}</p>")
    page = ("<!doctype html><meta charset='utf-8'><title>MoR study</title><style>body{font-family:sans-serif;"
            "max-width:70em}table{border-collapse:collapse}td{border:1px solid #ccc;padding:2px 6px}</style>"
            + "\n".join(body))
    return [atomic_write(out / "report.md", "\n".join(lines) + "\n"), atomic_write(out / "report.html", page),
            atomic_write(out / "results.json", json.dumps(results, indent=2) + "\n")]
