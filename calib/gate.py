"""The accuracy gate a reduced-precision bundle must pass, per bucket, to be placed at OUT
(``mordasr-calib``, ``mordasr-export --fp16 / --int8``). No torch: the CLIs read its defaults."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MIN_PSNR = 35.0  # dB against the FP32 PyTorch output, every bucket
DEFAULT_MAX_HR_LOSS = 0.15  # dB of PSNR against HR a bucket may lose relative to FP32


@dataclass(frozen=True)
class Gate:
    """What a reduced-precision bundle must keep of FP32, per bucket, to be placed at OUT."""

    min_psnr: float = DEFAULT_MIN_PSNR
    max_hr_loss: float = DEFAULT_MAX_HR_LOSS

    def failures(self, rows: list[dict], precision: str) -> list[str]:
        """One reason per failing bucket (empty when the bundle passes)."""
        fp32 = {r["label"]: r for r in rows if r["precision"] == "fp32"}
        reasons = []
        for r in rows:
            if r["precision"] != precision:
                continue
            if not r["finite"]:
                reasons.append(f"bucket {r['label']}: NaN/inf in the output")
            elif r["psnr_vs_fp32_torch"] < self.min_psnr:
                reasons.append(f"bucket {r['label']}: {r['psnr_vs_fp32_torch']:.2f} dB from FP32, below the "
                               f"{self.min_psnr:g} dB floor")
            elif r["label"] in fp32 and fp32[r["label"]]["psnr_vs_hr"] - r["psnr_vs_hr"] > self.max_hr_loss:
                loss = fp32[r["label"]]["psnr_vs_hr"] - r["psnr_vs_hr"]
                reasons.append(f"bucket {r['label']}: {loss:.2f} dB less than FP32 against HR, more than the "
                               f"{self.max_hr_loss:g} dB margin")
        return reasons

    def failing_buckets(self, rows: list[dict], precision: str) -> list[int | None]:
        reasons = set(self.failures(rows, precision))
        return [r["bucket"] for r in rows if r["precision"] == precision
                and any(reason.startswith(f"bucket {r['label']}:") for reason in reasons)]
