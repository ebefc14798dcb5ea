// Portable qualifiers for code shared by the host compiler and nvcc.
// Torch-free on purpose: the CMake core and its C++ tests include it without torch.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SVEN_HOST_DEVICE __host__ __device__
#define SVEN_INLINE __forceinline__
#else
#define SVEN_HOST_DEVICE
#define SVEN_INLINE inline
#endif
