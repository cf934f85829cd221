"""The ONNX backend: graphs run by onnxruntime, each site reduced inside the graph."""
