"""Run an exported ``.pte`` with the ExecuTorch runtime, checking its inputs against the program's own metadata.

A ``.pte`` has fixed input shapes; feeding it other shapes fails deep inside the runtime with an opaque status code.
:class:`PteProgram` reads the shapes and dtypes the program declares and names the mismatch before running.
"""

from __future__ import annotations

from pathlib import Path

import torch
from quantize.errors import MissingFileError, UserError

__all__ = ["PteInputError", "PteProgram", "StagedPrograms", "load_full_model", "program_bytes", "stage_paths"]

# ExecuTorch ScalarType codes (c10 numbering) of the dtypes our programs use.
_DTYPES = {0: torch.uint8, 1: torch.int8, 3: torch.int32, 4: torch.int64, 5: torch.float16, 6: torch.float32}


class PteInputError(UserError):
    """Inputs that do not match what a ``.pte`` program was exported for."""


class PteProgram:
    """A loaded ``.pte`` program (method ``forward``).

    Args:
        path: the ``.pte`` file.
        names: optional input names for error messages (e.g. ``("image", "input_ids", "attention_mask")``).
    """

    def __init__(self, path: str | Path, names: tuple[str, ...] | None = None) -> None:
        import executorch.kernels.quantized  # noqa: F401  (registers embedding_byte)
        from executorch.runtime import Runtime

        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFileError(f"no ExecuTorch program at {self.path}: export one with `ptq4ris export-pte`")
        try:
            program = Runtime.get().load_program(self.path)
            self.method = program.load_method("forward")
        except Exception as e:  # the runtime raises plain RuntimeErrors with a status code
            raise PteInputError(f"{self.path} is not a loadable ExecuTorch program ({e}); re-export it") from e
        meta = self.method.metadata
        self.input_shapes = [tuple(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]
        self.input_dtypes = [_DTYPES.get(meta.input_tensor_meta(i).dtype()) for i in range(meta.num_inputs())]
        self.names = names or tuple(f"input {i}" for i in range(len(self.input_shapes)))

    def _check(self, inputs: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        if len(inputs) != len(self.input_shapes):
            raise PteInputError(f"{self.path.name} takes {len(self.input_shapes)} inputs, got {len(inputs)}")
        checked = []
        for name, x, shape, dtype in zip(self.names, inputs, self.input_shapes, self.input_dtypes):
            if tuple(x.shape) != shape:
                raise PteInputError(
                    f"{self.path.name} was exported for {name} of shape {list(shape)}, got {list(x.shape)}: "
                    "resize/pad the input (the model's preprocessing does) or export for these shapes"
                )
            if dtype is not None and x.dtype != dtype:
                if x.dtype.is_floating_point != dtype.is_floating_point:
                    raise PteInputError(f"{self.path.name} expects {name} as {dtype}, got {x.dtype}")
                x = x.to(dtype)
            checked.append(x.contiguous())
        return checked

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.method.execute(self._check(inputs))[0]


FULL_INPUTS = ("image", "input_ids", "attention_mask")


class StagedPrograms:
    """The text and visual stage programs chained as one model, as the Android app runs them: ids → word features
    (``<stem>.text.pte``), then image + word features → mask logits (``<stem>.visual.pte``). It takes and returns
    what a full-model program does, so parity, benchmarks and ``segment`` use it interchangeably."""

    def __init__(self, text: str | Path, visual: str | Path) -> None:
        self.text = PteProgram(text, names=("input_ids", "attention_mask"))
        self.visual = PteProgram(visual, names=("image", "text_features", "attention_mask"))
        self.path = Path(visual)
        self.input_shapes = [self.visual.input_shapes[0], *self.text.input_shapes]
        self.input_dtypes = [self.visual.input_dtypes[0], *self.text.input_dtypes]

    def __call__(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.visual(image, self.text(input_ids, attention_mask), attention_mask)


def stage_paths(full: str | Path) -> tuple[Path, Path]:
    """Where ``export-pte --out X.pte`` writes the text and visual programs of ``X.pte``."""
    stem = Path(full).with_suffix("")
    return stem.with_name(f"{stem.name}.text.pte"), stem.with_name(f"{stem.name}.visual.pte")


def load_full_model(pte: str | Path) -> PteProgram | StagedPrograms:
    """The program at ``X.pte`` when it exists (for a full-model program, a callable ``(image, input_ids,
    attention_mask) -> logits``), else its text and visual stage programs chained into that callable (an export with
    ``--stages text visual``)."""
    pte = Path(pte)
    if pte.is_file():
        program = PteProgram(pte)
        if len(program.input_shapes) == len(FULL_INPUTS):
            program.names = FULL_INPUTS  # errors then name the inputs
        return program
    text, visual = stage_paths(pte)
    if text.is_file() and visual.is_file():
        return StagedPrograms(text, visual)
    raise MissingFileError(
        f"no ExecuTorch program at {pte} (nor its stage programs {text.name} and {visual.name}): export them with "
        "`ptq4ris export-pte`"
    )


def program_bytes(pte: str | Path) -> int:
    """Size on disk of ``X.pte``, or of its text and visual programs together when only they were exported."""
    pte = Path(pte)
    if pte.is_file():
        return pte.stat().st_size
    return sum(p.stat().st_size for p in stage_paths(pte))
