// The rms_norm kernels compiled for AVX-512 (x86-64-v4; CMakeLists.txt sets the flags for this file only).
#define IK_RMS_NORM_NS rms_norm_avx512
#define IK_VW 16
#include "cpu/rms_norm_kernels.h"
