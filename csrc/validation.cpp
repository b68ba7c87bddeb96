#include "validation.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace allocmoe {
namespace {
std::atomic<bool>& flag() {
  static std::atomic<bool> on{[] {
    const char* v = std::getenv("ALLOCMOE_VALIDATE");
    return v != nullptr && std::strcmp(v, "0") != 0 && v[0] != '\0';
  }()};
  return on;
}
}  // namespace

bool validation_enabled() { return flag().load(std::memory_order_relaxed); }
void set_validation_enabled(bool on) { flag().store(on, std::memory_order_relaxed); }
}  // namespace allocmoe
