// The swiglu kernels compiled for the build's baseline ISA (SSE2 on x86-64, the target's own elsewhere).
#define IK_SWIGLU_NS swiglu_generic
#define IK_VW 4
#include "cpu/swiglu_kernels.h"
