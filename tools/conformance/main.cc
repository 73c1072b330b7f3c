// kvc-conformance DIR: checks kvc against the golden vectors in DIR.
// Exit status 0 iff every check passed and at least one ran; 2 on bad usage.
#include <iostream>
#include <string>

#include "tools/conformance/conformance.h"

int main(int argc, char** argv) {
  if (argc != 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    std::cerr << "usage: kvc-conformance DIR\n"
                 "  Runs kvc's conformance checks on the golden files in DIR\n"
                 "  (codec.safetensors, win/csa/hca.safetensors; schema in tests/golden/README.md).\n";
    return 2;
  }
  const kvc::conformance::Summary summary = kvc::conformance::RunConformance(argv[1], std::cout);
  return summary.failed == 0 && summary.passed > 0 ? 0 : 1;
}
