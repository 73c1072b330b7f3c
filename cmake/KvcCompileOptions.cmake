# Compile options shared by every target kvc builds itself.
#
# HWY_WANT_AVX3_DL: Highway 1.0.3 compiles its AVX-512 VNNI/BF16 target only
# when asked; kvc wants it (Zen 4 and Ice Lake+ have it). No -march: dynamic
# dispatch picks the best target at run time.
function(kvc_target_options target)
  target_compile_definitions(${target} PRIVATE HWY_WANT_AVX3_DL)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE -Wall -Wextra -Wshadow -Wconversion
                                             -Wno-sign-conversion)
    if(KVC_WERROR)
      target_compile_options(${target} PRIVATE -Werror)
    endif()
    if(KVC_SANITIZE)
      target_compile_options(${target} PRIVATE -fsanitize=${KVC_SANITIZE}
                                               -fno-sanitize-recover=all -fno-omit-frame-pointer)
      target_link_options(${target} PRIVATE -fsanitize=${KVC_SANITIZE})
    endif()
  endif()
endfunction()
