"""The main job end to end: ``ptq4ris demo`` (calibrate, export for both phones, check, report) and ``ptq4ris
segment`` (one photo and sentence through any backend)."""
