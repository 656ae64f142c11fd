"""Y-PSNR of checkpoints on the study's heavy set, on the first N held-out centre crops (a probe:
minutes instead of the study's full evaluation).

    python heavy_subset.py VAL_HR_FOLDER N LABEL=CHECKPOINT [LABEL=CHECKPOINT ...]
"""

import sys
from pathlib import Path

import numpy as np

from mordasr.benchmarks.evaluate import evaluate, resolve_target
from mordasr.benchmarks.study import HEAVY, StudyConfig, centre_crops

folder, limit, specs = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
cfg = StudyConfig(out=Path("."), work=Path("."), data=Path("."), eval_data=folder, eval_limit=limit)
rows = evaluate([resolve_target(s) for s in specs], centre_crops(cfg), [*HEAVY, "bicubic-x4"])["per_image"]
table: dict[tuple[str, str], list[float]] = {}
for r in rows:
    table.setdefault((r["target"], r["recipe"]), []).append(r["psnr_y"])
targets = list(dict.fromkeys(r["target"] for r in rows))
print("| recipe | " + " | ".join(targets) + " |")
print("|---|" + "---:|" * len(targets))
for recipe in [*HEAVY, "bicubic-x4"]:
    print(f"| {recipe} | " + " | ".join(f"{np.mean(table[(t, recipe)]):.2f}" for t in targets) + " |")
print("| **heavy mean** | " + " | ".join(f"{np.mean([np.mean(table[(t, r)]) for r in HEAVY]):.2f}"
                                        for t in targets) + " |")
