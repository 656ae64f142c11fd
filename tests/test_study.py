"""The MoR study's measurement (benchmarks/study.py): paired differences, parameter matching,
layer groups, the report; the full study is hours of training and runs as ``mordasr-study``."""

from __future__ import annotations

import numpy as np
import pytest

from mordasr.benchmarks.study import FAMILIES, HEAVY, compare, layer_group, matching_adaptir_hidden, paired


def test_paired_difference_and_its_verdict():
    rng = np.random.default_rng(0)
    b = rng.normal(25, 2, 60)
    win = paired(list(b + 0.3 + rng.normal(0, 0.05, 60)), list(b))
    assert win["verdict"] == "win" and 0.25 < win["mean"] < 0.35 and win["ci95"][0] > 0 and win["n"] == 60
    tie = paired(list(b + rng.normal(0, 1.0, 60)), list(b))
    assert tie["verdict"] == "tie" and tie["ci95"][0] < 0 < tie["ci95"][1]
    assert paired(list(b - 0.5), list(b))["verdict"] == "lose"


def test_compare_pairs_each_run_with_its_own_seed():
    rows = []
    for seed in (0, 1):
        for image in ("a", "b", "c"):
            rows.append({"target": f"mor-s{seed}", "recipe": "noise-10", "image": image, "psnr_y": 20.0 + seed})
            rows.append({"target": f"lora-s{seed}", "recipe": "noise-10", "image": image, "psnr_y": 19.5 + seed})
            rows.append({"target": "base", "recipe": "noise-10", "image": image, "psnr_y": 18.0})
    assert compare(rows, (0, 1), "mor", "lora", ["noise-10"])["mean"] == pytest.approx(0.5)
    assert compare(rows, (0, 1), "mor", "base", ["noise-10"])["mean"] == pytest.approx(2.5)


def test_adaptir_width_matches_a_parameter_budget():
    from mordasr.model.io import base_path, load_checkpoint

    lora, _ = load_checkpoint(base_path("tiny"), adapter="lora")
    target = sum(p.numel() for p in lora.adapter_parameters())
    hidden, count = matching_adaptir_hidden(base_path("tiny"), target)
    assert abs(count / target - 1) < 0.05
    adaptir, _ = load_checkpoint(base_path("tiny"), adapter="adaptir", add_adapters=False)
    adaptir.config.adapter.adaptir_hidden = hidden
    adaptir.add_adapters()
    assert sum(p.numel() for p in adaptir.adapter_parameters()) == count


def test_unknown_ablations_are_refused(tmp_path):
    from mordasr.benchmarks.study import StudyConfig
    from mordasr.errors import MordasrError

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cfg = StudyConfig(out=tmp_path / "o", work=tmp_path / "w", data=tmp_path / "a", eval_data=tmp_path / "b",
                      ablations=("mor-top4", "mor-top9"))
    with pytest.raises(MordasrError, match="unknown ablation 'mor-top9'"):
        cfg.validate()
    cfg.ablations, cfg.confirm = ("mor-top4",), "mor-no-zero"
    with pytest.raises(MordasrError, match="--confirm mor-no-zero: not among the --ablations"):
        cfg.validate()


def test_families_heavy_set_and_layer_groups():
    from mordasr.benchmarks.recipes import RECIPES

    assert all(r in RECIPES for family in FAMILIES.values() for r in family)
    assert set(HEAVY) <= {r for family in FAMILIES.values() for r in family}
    assert layer_group("vae.encoder.fine.0.conv1") == "encoder"
    assert layer_group("unet.up_blocks.3.resnets.1.conv2") == "UNet up"
    assert layer_group("unet.mid_block.attentions.0.proj_in") == "UNet mid"


@pytest.mark.slow
def test_the_whole_study_runs_and_resumes(tmp_path):
    """Every phase on a few steps and synthetic photographs: the report, its plots and its tables
    come out, and a second run reuses the base, the runs and the evaluation."""
    from PIL import Image

    from mordasr.benchmarks.study import StudyConfig, run_study, write_report

    rng = np.random.default_rng(0)
    for folder, count in (("train", 6), ("val", 2)):
        (tmp_path / folder).mkdir()
        for i in range(count):
            image = (rng.uniform(0, 1, (96, 112, 3)) * 255).astype(np.uint8)
            Image.fromarray(image).save(tmp_path / folder / f"{i}.png")
    cfg = StudyConfig(out=tmp_path / "out", work=tmp_path / "work", data=tmp_path / "train",
                      eval_data=tmp_path / "val", eval_limit=2, eval_crop=64, base_vae_steps=2, base_sr_steps=2,
                      steps=2, seeds=(0, 1), adapters=("mor", "lora", "adaptir"), ablations=("mor-no-zero",),
                      confirm="mor-no-zero", rounds=2)
    results = run_study(cfg)
    files = write_report(results, cfg.out, "mordasr-study ...")
    assert {f.name for f in files} == {"report.md", "report.html", "results.json"}
    assert (cfg.out / "heatmap.png").is_file() and (cfg.out / "buckets.png").is_file()
    assert [r["family"] for r in results["per_family"]] == list(FAMILIES)
    assert set(results["adapted_minus_base_heavy"]) == {"mor", "lora", "adaptir"}
    assert {r["target"].split(" (")[0] for r in results["latency"]} >= {
        "folded UNet latency / merged dense-LoRA UNet latency"}
    params = results["trainable_parameters"]
    assert abs(params["adaptir"] / params["lora"] - 1) < 0.05 and params["mor-no-zero"] < params["mor"]
    assert [a["name"] for a in results["ablations"]] == ["mor-no-zero"]
    assert results["ablations"][0]["minus_mor"]["n"] == 2 * len(HEAVY)  # 2 images x the heavy recipes, one seed
    assert "## Ablations" in files[0].read_text() and "tiny" in results["per_recipe"][0]["psnr_y"]
    confirmed = results["confirmed"]
    assert confirmed["name"] == "mor-no-zero" and confirmed["heavy"]["lora"]["n"] == 2 * 2 * len(HEAVY)
    assert "## mor-no-zero on every seed" in files[0].read_text()
    stamps = {f.name: f.stat().st_mtime for f in (cfg.work / "evaluation").iterdir()}
    assert set(stamps) == {"base.json", "tiny.json", "mor-no-zero-s0.json", "mor-no-zero-s1.json"} | {
        f"{k}-s{s}.json" for k in ("mor", "lora", "adaptir") for s in (0, 1)}
    run_study(cfg)  # everything reused
    assert {f.name: f.stat().st_mtime for f in (cfg.work / "evaluation").iterdir()} == stamps
