"""CPU implementations that are torch compositions rather than compiled C++: oneDNN matmuls through ATen, and
custom autograd Functions with hand-written backwards (fewer, larger ops than the reference's autograd graph)."""
