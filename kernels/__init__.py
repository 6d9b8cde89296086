"""Triton kernels of ppml, installed as ``ppml.kernels``. Import them only where Triton can run (CUDA, or CPU tensors
under ``TRITON_INTERPRET=1`` set before the import)."""
