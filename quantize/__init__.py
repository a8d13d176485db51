"""ptq4ris host side: LAVT models, RefCOCO-format data, metrics, training and PTQ4RIS calibration."""

__version__ = "0.1.0"
