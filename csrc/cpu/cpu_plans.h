// Tiling-plan overrides of the CPU kernels (tuning and plan-invariance tests). The Python package reads them from
// the environment once (segnext_kernels/knobs.py: SEGNEXT_MSCA_FWD_PLAN, SEGNEXT_MLP_PLAN, SEGNEXT_MLP_BWD_PLAN)
// and sets them here when it loads the extension; tests set them through the binding. Empty = the kernels' own plan.
#pragma once

#include <string>

namespace segnext_cpu {

enum class PlanKnob : int { msca_fwd = 0, mlp_fwd = 1, mlp_bwd = 2 };

// which: 0 msca forward ("band:<n>" | "two:<images per group>"), 1 MLP forward, 2 MLP backward
// ("<pixels per band>:<hidden block>[:<groups>]"). Throws (TORCH_CHECK) for another `which`.
void set_plan_override(int which, const std::string& value);
std::string plan_override(PlanKnob which);

}  // namespace segnext_cpu
