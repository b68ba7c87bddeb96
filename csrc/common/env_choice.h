// One reader for the ALLOCMOE_*_PATH switches (route, experts, moe): the index of the variable's
// value in `choices`; unset or empty means choices[0] ("auto" by convention). Read on every call,
// so tests can force a path per call. Any other value raises an error that names the op, the
// variable and every choice.
#pragma once

#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <string>

#include "common/check.h"

namespace allocmoe {

inline int env_choice(const char* op, const char* var, std::initializer_list<const char*> choices) {
  const char* v = std::getenv(var);
  if (v == nullptr || v[0] == '\0') return 0;
  int i = 0;
  std::string all;
  for (const char* c : choices) {
    if (std::strcmp(v, c) == 0) return i;
    all += (i++ == 0 ? "" : ", ");
    all += c;
  }
  ALLOCMOE_CHECK(false, op, ": ", var, " must be one of ", all, ", got '", v, "'");
  return 0;
}

}  // namespace allocmoe
