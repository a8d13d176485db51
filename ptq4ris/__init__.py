"""The ``ptq4ris`` command line: the front door that orchestrates the layers below it (``quantize`` → the calibrated
graph → ``mobile_runtime`` / ``ios_export`` lowering → runtime checks, and the ``demo``). Nothing below imports it."""
