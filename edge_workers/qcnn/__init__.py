"""Q-CNN (Wu et al., CVPR 2016): product-quantized conv/FC layers, their compressor, file format and runtime.

Kept import-light: numba, onnx, onnxruntime(-extensions) and scikit-learn are
imported by the submodules that need them (``compress``, ``export``, ``ops``,
``runtime``), so ``edgeq`` starts without them.
"""
