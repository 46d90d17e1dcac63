"""CPU kernels in C++ (built with torch.utils.cpp_extension); they import only torch."""
