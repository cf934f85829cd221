"""Format-neutral measuring: what a site is, the recorder that names sites, the accumulators and
the histogram. Nothing here imports a backend, onnx, onnxruntime or triton."""
