"""Core ML parity on Linux: does the ``.mlpackage`` compute what calibration simulated?

The package is executed by :class:`~ios_export.mil_interpreter.MilInterpreter` (fp16 storage emulated when the package
computes in fp16) on the same inputs as the simulated model — every pair of a refer split and natural photographs —
with the statistics of :mod:`quantize.deploy.parity_stats`. Stage packages found beside the full one are checked on their
own. :func:`first_divergence` names the first op whose output departs from the converted PT2E graph it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from quantize.deploy.parity_stats import ParityAccumulator, parity_report
from quantize.errors import UserError

from .mil_interpreter import MilInterpreter, load_program

__all__ = ["CoreMLProgram", "first_divergence", "run_parity", "stage_parity"]


class CoreMLProgram:
    """A saved ``.mlpackage`` as a callable on torch tensors, executed by the MIL interpreter."""

    def __init__(self, package: str | Path, stage: str | None = None) -> None:
        self.path = Path(package)
        self.interpreter = MilInterpreter(load_program(self.path))
        self.input_names = self.interpreter.input_names
        self.input_shapes = [tuple(v.shape) for v in self.interpreter.function.inputs.values()]
        if stage is not None:
            self._check_stage(stage)

    def _check_stage(self, stage: str) -> None:
        """Refuse a package of another model or stage than ``stage`` (``full``, ``text``, ``visual``) by its inputs."""
        from quantize.deploy.stages import STAGES

        expected = STAGES[stage]
        image = dict(zip(self.input_names, self.input_shapes)).get("image")
        image_ok = image is None or (len(image) == 4 and image[1] == 3 and image[2] == image[3])
        if tuple(self.input_names) != expected or not image_ok:
            found = ", ".join(f"{n} {list(s)}" for n, s in zip(self.input_names, self.input_shapes)) or "none"
            raise UserError(
                f"{self.path} takes {found}, but a {stage} LAVT package takes {', '.join(expected)}"
                f"{' (image [1, 3, S, S])' if 'image' in expected else ''}: give the {stage} package that "
                "`ptq4ris export-coreml` wrote"
            )

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if len(inputs) != len(self.input_names):
            raise UserError(f"{self.path.name} takes {len(self.input_names)} inputs ({self.input_names})")
        feeds = {name: x.detach().cpu().numpy() for name, x in zip(self.input_names, inputs)}
        out = self.interpreter(**feeds)
        return torch.from_numpy(np.asarray(out[self.interpreter.output_names[0]], dtype=np.float32))


def run_parity(
    simulated: torch.nn.Module,
    package: str | Path,
    dataset,
    limit: int | None = None,
    photos: bool = True,
    progress: bool = False,
) -> dict[str, Any]:
    """End-to-end parity of a full-model package, plus the stage packages beside it when they exist."""
    from .export_coreml import package_paths

    program = CoreMLProgram(package, stage="full")
    report = parity_report(simulated, program, dataset, program.input_shapes[0][-1], limit, photos, progress)
    paths = package_paths(Path(package))
    if paths["text"].exists() and paths["visual"].exists():
        report["stages"] = stage_parity(simulated, paths["text"], paths["visual"], dataset, limit=min(limit or 64, 64))
    return report


@torch.no_grad()
def stage_parity(simulated: torch.nn.Module, text: Path, visual: Path, dataset, limit: int = 64) -> dict[str, Any]:
    """Each stage package alone, fed the simulated model's own inputs for that stage: the text package's features
    against the simulated text encoder's, and the visual package's masks given the simulated word features."""
    text_program, visual_program = CoreMLProgram(text, stage="text"), CoreMLProgram(visual, stage="visual")
    # Word features at padding positions are computed but masked out by every consumer; only real tokens count.
    max_diff, sum_diff, count, scale = 0.0, 0.0, 0, 0.0
    acc = ParityAccumulator()
    for index in range(min(limit, len(dataset))):
        item = dataset[index]
        image, ids, mask = item["image"][None], item["input_ids"][None], item["attention_mask"][None]
        features = simulated.encode_text(ids, mask)
        real = mask[0].bool()
        diff = (text_program(ids, mask) - features)[0][:, real].abs()  # (C, tokens)
        max_diff, sum_diff, count = max(max_diff, float(diff.max())), sum_diff + float(diff.sum()), count + diff.numel()
        scale = max(scale, float(features[0][:, real].abs().max()))
        deployed = visual_program(image, features, mask)[0]
        acc.update(index, simulated.forward_with_text_features(image, features, mask)[0], deployed)
    visual_summary = acc.summary()
    return {
        "pairs": acc.pairs,
        "text": {
            "max_abs_feature_diff": max_diff,
            "mean_abs_feature_diff": sum_diff / max(count, 1),
            "max_abs_feature": scale,
        },
        "visual": {k: visual_summary[k] for k in ("mask_agreement", "max_abs_logit_diff", "max_logit_diff_lsb")},
    }


def first_divergence(
    package: str | Path, reference: torch.nn.Module, inputs: tuple[torch.Tensor, ...], tolerance: float = 0.02
) -> dict[str, Any]:
    """Run ``package`` and the graph it was converted from (``reference``: the converted PT2E graph, or the float
    stage) side by side, match MIL outputs to graph nodes by name, and name the first op whose output differs by more
    than ``tolerance`` × the reference's largest magnitude. The ops are listed in execution order, so the first one
    over the line is where the package starts to compute something else."""
    program = CoreMLProgram(package)
    graph = torch.export.export(reference, inputs).run_decompositions({}).module()
    captured: dict[str, np.ndarray] = {}

    class Capture(torch.fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if isinstance(result, torch.Tensor) and result.is_floating_point():
                captured[n.name] = result.detach().numpy()
            return result

    with torch.no_grad():
        Capture(graph).run(*inputs)
    rows: list[dict[str, Any]] = []

    def compare(op, outputs) -> None:
        for var, value in zip(op.outputs, outputs):
            ref = captured.get(var.name)
            if ref is None or ref.size != np.asarray(value).size or np.asarray(value).dtype.kind != "f":
                continue
            ref = ref.reshape(np.asarray(value).shape)
            scale = float(np.abs(ref).max()) or 1.0
            rows.append(
                {
                    "op": op.op_type,
                    "output": var.name,
                    "max_abs_diff": float(np.abs(value.astype(np.float32) - ref).max()),
                    "relative": float(np.abs(value.astype(np.float32) - ref).max()) / scale,
                }
            )

    feeds = {name: x.numpy() for name, x in zip(program.input_names, inputs)}
    program.interpreter.run(feeds, on_op=compare)
    first = next((r for r in rows if r["relative"] > tolerance), None)
    return {
        "matched_ops": len(rows),
        "tolerance": tolerance,
        "first": first,
        "largest": sorted(rows, key=lambda r: -r["relative"])[:5],
    }
