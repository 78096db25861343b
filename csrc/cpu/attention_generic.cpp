// The attention kernels compiled for the build's baseline ISA (SSE2 on x86-64, the target's own elsewhere).
#define IK_ATTN_NS attn_generic
#define IK_VW 4
#include "cpu/attention_kernels.h"
