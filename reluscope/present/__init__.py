"""Output formats: one module per format over the JSON report."""
