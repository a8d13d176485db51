"""PTQ4RIS calibration: quantizer primitives (``primitives``); placement, scale search and recipes follow."""
