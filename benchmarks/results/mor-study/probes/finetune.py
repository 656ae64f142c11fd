"""Fine-tune whole parts of the study's base (no adapters) on the adapters' data: how far full
weights get in the same budget. PARTS: comma-separated parameter-name prefixes, e.g.
``vae.encoder,vae.quant_conv,unet`` (what the adapters adapt) or ``vae,unet`` (the decoder too).

    python finetune.py BASE OUT PARTS STEPS LR TRAIN_HR_FOLDER
"""

import sys

import torch
import torch.nn.functional as F

from mordasr.benchmarks.study import ADAPTER_MIX
from mordasr.data.degradations import mixed_degraded_batch, parse_mix
from mordasr.data.samples import training_images
from mordasr.model.io import load_checkpoint, save_checkpoint
from mordasr.training.common import autocast, nchw, seed_everything
from mordasr.training.schedule import warmup_cosine

base, out, parts, steps, lr, data = sys.argv[1], sys.argv[2], sys.argv[3].split(","), int(sys.argv[4]), \
    float(sys.argv[5]), sys.argv[6]
model, _ = load_checkpoint(base, add_adapters=False)
for name, p in model.named_parameters():
    p.requires_grad_(any(name.startswith(part) for part in parts))
params = [p for p in model.parameters() if p.requires_grad]
print(f"{sum(p.numel() for p in params):,} trainable parameters")
rng = seed_everything(0)
mix = parse_mix(ADAPTER_MIX)
sampler = training_images(data, 128, 0)
opt = torch.optim.AdamW(params, lr)
sched = warmup_cosine(opt, steps)
model.train()
for _ in range(steps):
    hr = sampler.sample(2)
    lr_t, hr_t = nchw(mixed_degraded_batch(hr, 4, rng, mix)), nchw(hr)
    with torch.no_grad():
        scores = model.estimate(lr_t)
    with autocast("bf16"):
        restored = model(lr_t, scores)
    loss = F.mse_loss(restored.float(), hr_t)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
model.eval()
save_checkpoint(model, out, {"kind": "base"})
