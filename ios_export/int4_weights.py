"""A MIL graph pass that stores 4-bit weights in int4.

The PT2E graph carries a W4 weight as int8 values on a 4-bit grid (``quant_min=-8, quant_max=7``), and coremltools
turns it into an int8 ``constexpr_blockwise_shift_scale``. The values, scales and offsets are exactly ours; only the
container is twice as wide as it needs to be. This pass re-types such data as int4 (iOS18), which halves the weight
file without touching a single value. An 8-bit grid always reaches ±127 on some channel, so data that fits in
[-8, 7] is a 4-bit grid and nothing else is changed.
"""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil.mil import Builder as mb
from coremltools.converters.mil.mil import types
from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
from coremltools.converters.mil.mil.passes.pass_registry import register_pass

__all__ = ["PASS_NAME"]

PASS_NAME = "ptq4ris::store_4bit_weights_as_int4"


def _is_4bit_grid(data: np.ndarray) -> bool:
    return data.dtype == np.int8 and not data.dtype.metadata and int(data.min()) >= -8 and int(data.max()) <= 7


@register_pass(namespace="ptq4ris")
class store_4bit_weights_as_int4(AbstractGraphPass):
    def apply(self, prog) -> None:
        for function in prog.functions.values():
            for op in list(function.operations):
                if op.op_type != "constexpr_blockwise_shift_scale":
                    continue
                data = op.data.val
                if data is None or not _is_4bit_grid(np.asarray(data)):
                    continue
                offset = op.offset
                if offset is not None and np.any(offset.val != 0):
                    continue  # our weight grids are symmetric; anything else keeps its container
                with function:
                    new = mb.constexpr_blockwise_shift_scale(
                        data=np.asarray(data).astype(types.np_int4_dtype),
                        scale=op.scale.val,
                        before_op=op,
                        name=op.outputs[0].name + "_int4",
                    )
                op.enclosing_block.replace_uses_of_var_after_op(
                    anchor_op=op, old_var=op.outputs[0], new_var=new, force_replace=True
                )
                op.enclosing_block.remove_ops([op])
