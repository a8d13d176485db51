"""ExecuTorch side of ptq4ris: lowering to XNNPACK integer kernels, ``.pte`` export and runtime checks."""
