add_compile_options($<$<COMPILE_LANGUAGE:CXX>:-Wall> $<$<COMPILE_LANGUAGE:CXX>:-Wextra>
                    $<$<COMPILE_LANGUAGE:CXX>:-Wno-unused-parameter>)
if(BRIGADE_HAVE_CUDA)
  add_compile_definitions(BRIGADE_WITH_CUDA=1)
endif()
if(BRIGADE_HAVE_NCCL)
  add_compile_definitions(BRIGADE_WITH_NCCL=1)
endif()

# One CMake library per folder (DESIGN.md). Sources are picked up by glob so a new file
# needs no CMake edit; CONFIGURE_DEPENDS re-globs on build.

# Every target shares one precompiled header: LibTorch's headers dominate compile time.
function(brigade_use_pch target)
  if(TARGET brigade_pch)
    target_precompile_headers(${target} REUSE_FROM brigade_pch)
  endif()
endfunction()

add_library(brigade_pch STATIC cmake/pch.cpp)
target_link_libraries(brigade_pch PUBLIC ${TORCH_LIBRARIES})
target_precompile_headers(brigade_pch PRIVATE core/pch.h)

# Executables put libstdc++ ahead of LibTorch: the pip wheel carries an old private
# copy of std::filesystem whose remove_all crashes if it wins symbol resolution
# (pytorch/pytorch#133437).
function(brigade_executable target)
  target_link_libraries(${target} PRIVATE "-Wl,--push-state,--no-as-needed" stdc++ "-Wl,--pop-state")
  brigade_use_pch(${target})
endfunction()

function(brigade_module name)
  file(GLOB _sources CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/${name}/*.cpp)
  list(FILTER _sources EXCLUDE REGEX "/main\\.cpp$")
  if(BRIGADE_HAVE_CUDA)
    file(GLOB _cuda CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/${name}/*.cu)
    list(APPEND _sources ${_cuda})
    # foo_nocuda.cpp is the fallback of foo_cuda.cu.
    list(FILTER _sources EXCLUDE REGEX "_nocuda\\.cpp$")
  endif()
  # foo_nccl.cpp needs NCCL; foo_nonccl.cpp stands in for it without.
  if(BRIGADE_HAVE_NCCL)
    list(FILTER _sources EXCLUDE REGEX "_nonccl\\.cpp$")
  else()
    list(FILTER _sources EXCLUDE REGEX "_nccl\\.cpp$")
  endif()
  if(NOT _sources)
    add_library(brigade_${name} INTERFACE)
    target_include_directories(brigade_${name} INTERFACE ${CMAKE_SOURCE_DIR})
    foreach(dep ${ARGN})
      target_link_libraries(brigade_${name} INTERFACE brigade_${dep})
    endforeach()
    target_link_libraries(brigade_${name} INTERFACE ${TORCH_LIBRARIES})
    return()
  endif()
  add_library(brigade_${name} STATIC ${_sources})
  target_include_directories(brigade_${name} PUBLIC ${CMAKE_SOURCE_DIR})
  foreach(dep ${ARGN})
    target_link_libraries(brigade_${name} PUBLIC brigade_${dep})
  endforeach()
  target_link_libraries(brigade_${name} PUBLIC ${TORCH_LIBRARIES} nlohmann_json::nlohmann_json)
  brigade_use_pch(brigade_${name})
endfunction()

