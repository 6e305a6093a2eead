#include "cpu_plans.h"

#include <c10/util/Exception.h>

#include <mutex>

namespace segnext_cpu {
namespace {
std::mutex g_mutex;
std::string g_plans[3];
}  // namespace

void set_plan_override(int which, const std::string& value) {
  TORCH_CHECK(which >= 0 && which < 3, "set_plan_override: which must be 0 (msca forward), 1 (mlp forward) or 2 "
              "(mlp backward), got ", which);
  std::lock_guard<std::mutex> lock(g_mutex);
  g_plans[which] = value;
}

std::string plan_override(PlanKnob which) {
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_plans[static_cast<int>(which)];
}

}  // namespace segnext_cpu
