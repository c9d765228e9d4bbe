"""The ONNX backend: gradient graphs built from the .onnx file, run in onnxruntime."""
