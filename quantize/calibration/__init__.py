"""PTQ4RIS calibration: quantizer primitives, fake-quant modules and their placement over LAVT, the Hessian-guided
scale search, RORQ channel-order folding, the calibrated-model artifact, baselines and sensitivity analysis."""
