"""ARM numerics without a phone: the ``.pte`` run by the aarch64 native runner under qemu (XNNPACK's NEON kernels)
against the simulated model, with the ARM-vs-x86 difference of the same program on the same inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from quantize.deploy.parity_stats import lsb, natural_photo_pairs, parity_on_dataset, parity_on_pairs

from .native_runner import NativeRunner
from .runtime import load_full_model, stage_paths

__all__ = ["ArmVsX86", "arm_parity"]


class ArmVsX86:
    """A full-model program (or the text and visual stage programs chained, when only they were exported) run on
    emulated ARM (what parity sees) and, on the side, on this machine's x86 runtime, keeping the largest ARM-vs-x86
    difference in LSBs of an 8-bit grid over the x86 logits' range."""

    def __init__(self, pte: str | Path, runner: NativeRunner) -> None:
        self.pte, self.runner = Path(pte), runner
        self.x86 = load_full_model(self.pte)
        self.stages = None if self.pte.is_file() else stage_paths(self.pte)
        self.reset()

    def _arm(self, image: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
        """ARM logits and the emulated latency (ms) of one pair."""
        if self.stages is None:
            result = self.runner.run(self.pte, (image, ids, mask))
            return result.outputs[0], result.latency_ms["median"]
        text = self.runner.run(self.stages[0], (ids, mask))
        visual = self.runner.run(self.stages[1], (image, text.outputs[0], mask))
        return visual.outputs[0], text.latency_ms["median"] + visual.latency_ms["median"]

    def reset(self) -> None:
        self.max_abs, self.max_lsb, self.pixels, self.agree, self.latencies = 0.0, 0.0, 0, 0, []

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        arm, latency = self._arm(*inputs)
        x86 = self.x86(*inputs)
        diff = float((arm - x86).abs().max())
        self.max_abs = max(self.max_abs, diff)
        self.max_lsb = max(self.max_lsb, diff / lsb(x86))
        self.pixels += arm[0, 0].numel()
        self.agree += int((arm.argmax(1) == x86.argmax(1)).sum())
        self.latencies.append(latency)
        return arm

    def summary(self) -> dict[str, Any]:
        return {
            "max_abs_diff": self.max_abs,
            "max_diff_lsb": self.max_lsb,
            "mask_agreement": 100.0 * self.agree / max(self.pixels, 1),
            "emulated_ms_median": sorted(self.latencies)[len(self.latencies) // 2] if self.latencies else None,
        }


def arm_parity(
    simulated: torch.nn.Module,
    pte: str | Path,
    dataset,
    runner: NativeRunner,
    limit: int = 64,
    photos: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """Emulated-ARM parity on the first ``limit`` pairs of ``dataset`` and on natural photographs: the usual parity
    statistics of ARM against the simulated model, plus ``arm_vs_x86`` per input set."""
    device = ArmVsX86(pte, runner)
    sets = {}
    sets[f"{dataset.dataset} {dataset.split}"] = parity_on_dataset(
        simulated, device, dataset, limit, batch_size=8, progress=progress
    )
    sets[f"{dataset.dataset} {dataset.split}"]["arm_vs_x86"] = device.summary()
    if photos:
        device.reset()
        size = device.x86.input_shapes[0][-1]
        sets["natural photographs"] = parity_on_pairs(simulated, device, natural_photo_pairs(dataset.tokenizer, size))
        sets["natural photographs"]["arm_vs_x86"] = device.summary()
    return {"sets": sets, "emulator": f"qemu-aarch64 -cpu {runner.prefix[2] if runner.prefix else 'none'}"}
