// Picks the decode attention kernels' ISA as attention.cpp does for the packed kernels (the widest built that both
// the CPU and the caller allow), after checking the row lengths: the kernels read keys [0, seqlens[b]) of each slot,
// so a length outside [0, max_keys] would read past the cache.
#include <stdexcept>
#include <string>

#include "cpu/decode_attention.h"
#include "entry_points.h"

namespace ik {

bool decode_attention_cpu(const DecodeAttentionLaunch& a, int isa, int num_threads) {
  const int64_t* seqlens = reinterpret_cast<const int64_t*>(a.seqlens);
  for (int64_t b = 0; b < a.batch; ++b)
    if (seqlens[b] < 0 || seqlens[b] > a.max_keys)
      throw std::invalid_argument("seqlens_k[" + std::to_string(b) + "] = " + std::to_string(seqlens[b]) +
                                  " is outside [0, " + std::to_string(a.max_keys) + "] (the cache's positions)");
  switch (attention_isa_cpu(isa)) {
#if defined(IK_ATTENTION_X86)
    case kIsaAvx512: return decode_attn_avx512::decode_attention(a, num_threads);
    case kIsaAvx2: return decode_attn_avx2::decode_attention(a, num_threads);
#endif
    default: return decode_attn_generic::decode_attention(a, num_threads);
  }
}

}  // namespace ik
