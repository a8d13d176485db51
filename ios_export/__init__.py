"""Core ML side of ptq4ris: ``.mlpackage`` export from the same calibrated graph, and numerics checks on Linux."""
