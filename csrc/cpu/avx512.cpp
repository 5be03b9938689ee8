// The BN and elementwise kernels again, compiled for AVX-512 (F/BW/VL/DQ): at::vec's 512-bit
// Vectorized, twice the lanes of the AVX2 build. isa.cpp calls them only on a CPU that has these
// extensions. One translation unit for both sources keeps the build to one extra compile.
//
// setup.py compiles every C++ file with the AVX2 flags, so this file switches the target itself
// (before any header: every function here, ATen's inline ones included, is AVX-512 code) and selects
// at::vec's AVX-512 implementation, whose types live in their own namespace (at::vec::AVX512), as
// do vec.h's helpers. Inline functions of shared headers that are emitted out of line here too are
// one symbol with the AVX2 files' copies; setup.py lists this file last, and the GNU linker keeps
// the first copy, so the AVX2 code never calls into AVX-512 code.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,avx512f,avx512bw,avx512vl,avx512dq")
// g++ (unlike gcc for C) does not define the ISA macros for a target pragma; headers that test them
// (sleef.h, ATen's vec512) need them.
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#undef CPU_CAPABILITY
#undef CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#pragma GCC diagnostic ignored "-Wpsabi"  // the 512-bit ABI note: nothing here crosses ISAs by value
// GCC 12 false positive inside its own avx512fintrin.h (the _mm512_undefined_* idiom).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define RESNET_FAST_CPU_ISA ::resnet_fast::cpu::Isa::kAvx512
#define RESNET_FAST_CPU_VARIANT_TU

#include "batch_norm.cpp"
#include "elementwise.cpp"
#endif
