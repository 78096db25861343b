// The rms_norm kernels compiled for the build's baseline ISA (SSE2 on x86-64, the target's own elsewhere).
#define IK_RMS_NORM_NS rms_norm_generic
#define IK_VW 4
#include "cpu/rms_norm_kernels.h"
