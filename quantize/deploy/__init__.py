"""The calibrated graph, backend-neutral: what the ExecuTorch (``mobile_runtime``) and Core ML (``ios_export``)
lowerings both consume.

- :mod:`.deploy_form`: the calibrated quantizers rewritten as streams of stock integer ops;
- :mod:`.calibrated_quantizer`: the PT2E ``Quantizer`` that puts the calibrated grids into the exported graph;
- :mod:`.output_split`: massive GEMM output channels on an int8 range of their own;
- :mod:`.stages`: the programs a model is cut into (full, text, visual) and their inputs;
- :mod:`.graph`: the converted PT2E graph of one stage, and the calibration pairs its output ranges are observed on;
- :mod:`.parity_stats`: the statistics a deployed program is checked with against the simulated model.

Nothing here imports a backend: importing this package leaves ``executorch`` and ``coremltools`` unloaded.
"""
