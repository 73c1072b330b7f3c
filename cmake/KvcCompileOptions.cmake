# Compile options shared by every target kvc builds itself.
#
# HWY_WANT_AVX3_DL: Highway 1.0.3 compiles its AVX-512 VNNI/BF16 target only
# when asked; kvc wants it (Zen 4 and Ice Lake+ have it). No -march: dynamic
# dispatch picks the best target at run time.
# -ffp-contract=off: bit-exactness needs every product rounded on its own
# (spec §3: no fused multiply-add); GCC would otherwise fuse a*b+c in code
# compiled for FMA-capable targets, making scalar code differ per target.
function(kvc_target_options target)
  target_compile_definitions(${target} PRIVATE HWY_WANT_AVX3_DL)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE -Wall -Wextra -Wshadow -Wconversion
                                             -Wno-sign-conversion -Wno-missing-field-initializers
                                             -ffp-contract=off)
    if(KVC_WERROR)
      target_compile_options(${target} PRIVATE -Werror)
    endif()
    if(KVC_FUZZ)
      target_compile_options(${target} PRIVATE -fsanitize=fuzzer-no-link)  # coverage for libFuzzer
    endif()
    if(KVC_SANITIZE)
      target_compile_options(${target} PRIVATE -fsanitize=${KVC_SANITIZE}
                                               -fno-sanitize-recover=all -fno-omit-frame-pointer)
      target_link_options(${target} PRIVATE -fsanitize=${KVC_SANITIZE})
    endif()
  endif()
endfunction()
