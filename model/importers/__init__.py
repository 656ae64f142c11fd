"""Checkpoints trained elsewhere (OSEDiff, peft, diffusers LoRA) as mordasr dense-LoRA checkpoints."""
