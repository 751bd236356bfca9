"""torch.compile(fullgraph=True) over whole trajectories: the fused op is one opaque node
(fused_sched::fused_step), a traced step has no graph break, and it does not recompile per
step.

Covered: the DDIM family (timestep passed as an element of scheduler.timesteps). Not yet:
DPM-Solver, whose per-step Python state (step_index, lower_order_nums) dynamo guards on, so
it recompiles every step as diffusers' own class does; see the Triton issue's note.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from drivers import PAIRS

KINDS = {"ddim": dict(), "ddim_inverse": dict(),
         "cogvideox_ddim": dict(prediction_type="v_prediction", timestep_spacing="trailing")}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_compiled_trajectory_has_no_graph_breaks_or_per_step_recompiles(backend, kind):
    torch._dynamo.reset()
    counters.clear()
    fused_cls = PAIRS[kind][1]
    eager, traced = fused_cls(**KINDS[kind]), fused_cls(**KINDS[kind])
    for s in (eager, traced):
        s.set_timesteps(10)

    @torch.compile(fullgraph=True, backend="eager")
    def step(m, t, x):
        return traced.step(m, t, x, return_dict=False)[0]

    x_eager = x_traced = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for i in range(10):
        x_eager = eager.step(torch.tanh(x_eager), eager.timesteps[i], x_eager, return_dict=False)[0]
        x_traced = step(torch.tanh(x_traced), traced.timesteps[i], x_traced)
        # Same op on the same backend: the traced graph computes exactly the eager result.
        assert torch.equal(x_traced, x_eager), f"step {i}"
    # One graph for the first call, at most one more once dynamo makes the timestep dynamic.
    assert counters["stats"]["unique_graphs"] <= 2
    assert not counters["graph_break"]
