"""r1core.kernels: Triton (and CUDA-extension) implementations of r1core's hot paths.

Each `<op>.py` holds the Triton kernels, a launcher that asserts the contract, the
autograd.Function, the public `<op>()` and `<op>_ref()` (readable PyTorch, the test oracle).
"""
