// Errors raised by native code. Core, CPU and CUDA code throw tcal::Error; the N-API layer turns each into a
// typed JS error (lib/errors.ts). Nothing here aborts the process.
#pragma once
#include <cstddef>
#include <stdexcept>
#include <string>

namespace tcal {

enum class ErrorKind { InvalidArgument, Cuda, OutOfMemory, NotCompiled, Internal };

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind(kind) {}
  ErrorKind kind;
  std::string argument;   // InvalidArgument: which argument
  std::string cudaName;   // Cuda: e.g. cudaErrorInvalidDevice, CUBLAS_STATUS_NOT_SUPPORTED
  int number = 0;         // Cuda: the numeric status
  std::string op;         // Cuda / OutOfMemory: the call or op that failed
  size_t requested = 0;   // OutOfMemory
  size_t freeBytes = 0;   // OutOfMemory
  std::string device;     // OutOfMemory
};

[[noreturn]] inline void throwInvalid(const std::string& argument, const std::string& message) {
  Error e(ErrorKind::InvalidArgument, argument + ": " + message);
  e.argument = argument;
  throw e;
}

[[noreturn]] inline void throwNotCompiled(const std::string& what) {
  throw Error(ErrorKind::NotCompiled, what + " is not compiled into this binary (built without CUDA)");
}

#define TCAL_CHECK_ARG(cond, arg, msg) \
  do {                                 \
    if (!(cond)) ::tcal::throwInvalid(arg, msg); \
  } while (0)

}  // namespace tcal
