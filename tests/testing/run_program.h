// Runs a program with arguments through the shell and returns its exit
// status (-1 if it did not exit normally), appending its output to `out`.
#ifndef KVC_TESTS_TESTING_RUN_PROGRAM_H_
#define KVC_TESTS_TESTING_RUN_PROGRAM_H_

#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <string>

namespace kvc::testing {

// `stderr_too`: capture stderr with stdout, else discard it.
inline int RunProgram(const std::string& program, const std::string& args, std::string* out, bool stderr_too) {
  const std::string command = program + " " + args + (stderr_too ? " 2>&1" : " 2>/dev/null");
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return -1;
  std::array<char, 4096> buffer;
  size_t n;
  while ((n = fread(buffer.data(), 1, buffer.size(), pipe)) > 0) out->append(buffer.data(), n);
  const int status = pclose(pipe);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

}  // namespace kvc::testing

#endif  // KVC_TESTS_TESTING_RUN_PROGRAM_H_
