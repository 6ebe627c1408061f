"""The integration loop and its step-size controllers (torchadjoint.integrate,
torchadjoint.step_size): what the loop promises beyond accuracy — the messages of a solve
that cannot go on, early stops, and how many evaluations of f an output costs."""
import pytest
import torch

import torchadjoint as ta
from torchadjoint.controller import PIController
from torchadjoint.integrate import Landing, integrate
from torchadjoint.tableaux import DOPRI5, RK4

F64 = torch.float64


def test_an_implicit_solve_past_its_budget_in_float32_is_a_solve_error():
    # Backwards from t = 1 the mode e^{-100 t} grows by e^100, past float32's range (3.4e38
    # at t = 0.11): the steps stall near t = 0.16. The max_num_steps diagnosis read the
    # ESDIRK tableau's rows (diagonal included) as explicit ones, and numpy raised "could not
    # broadcast input array from shape (2,) into shape (1,)" instead of the SolveError.
    a = torch.tensor([[-1.0, 0.5], [0.0, -100.0]])
    t = torch.tensor([1.0, 0.4, 0.0])
    with pytest.raises(ta.SolveError, match=r"max_num_steps=50 exceeded") as info:
        ta.solve(lambda t, y: y @ a.T, torch.ones(3, 2), t, method="kvaerno5", rtol=1e-6, atol=1e-8, max_num_steps=50)
    assert 0.0 < info.value.t < 1.0 and info.value.direction == "forward"
    # A budget that lets it reach the stall says why tolerances cannot help.
    with pytest.raises(ta.SolveError, match=r"max_num_steps=320 exceeded.*near the largest float32.*solve in float64") as info:
        ta.solve(lambda t, y: y @ a.T, torch.ones(3, 2), t, method="kvaerno5", rtol=1e-6, atol=1e-8, max_num_steps=320)
    assert "loosen rtol/atol" not in str(info.value)


def test_step_size_underflow_under_an_implicit_method_does_not_blame_stiffness():
    # y' = y², y(0) = 1 blows up at t = 1, whatever the method.
    def blow_up(method):
        with pytest.raises(ta.SolveError, match="step size underflow") as info:
            ta.solve(lambda t, y: y**2, torch.ones(1, dtype=F64), torch.tensor([0.0, 2.0], dtype=F64), method=method,
                     rtol=1e-4, atol=1e-6)
        assert info.value.t == pytest.approx(1.0, abs=1e-3)
        return info.value.reason

    implicit = blow_up("kvaerno3")
    assert "explicit" not in implicit and "blow up" in implicit
    assert "loosen rtol/atol" in implicit and "another method" in implicit and "jump_t" in implicit
    explicit = blow_up("dopri5")
    assert "too stiff for an explicit method" in explicit


def test_on_accept_returning_true_ends_the_solve_at_that_step():
    # The checkpointed replays end this way (no exception): nothing runs after the step.
    f_calls = []

    def f(t, y):
        f_calls.append(t)
        return -y

    seen = []

    def on_accept(info):
        seen.append(info.t1)
        return len(seen) == 3

    result = integrate(f, torch.ones(2, dtype=F64), 0.0, 1.0, (0.0, 0.5, 1.0), RK4, grid=[0.1 * k for k in range(1, 11)],
                       on_accept=on_accept)
    assert seen == pytest.approx([0.1, 0.2, 0.3]) and result.t_end == seen[-1]
    # rk4: f at each step's start and three more stages; nothing after the third step.
    assert result.stats["accepted"] == 3 and result.stats["nfe"] == len(f_calls) == 3 * 4
    assert torch.isnan(result.ys[1:]).all() and torch.equal(result.ys[0], torch.ones(2, dtype=F64))


def test_a_continued_adaptive_solve_retakes_the_same_steps():
    # h_next, controller_state and f_end of a solve that stopped continue it seamlessly:
    # the steps after the stop are bitwise those of the uninterrupted solve.
    a = torch.tensor([[-0.5, 1.0], [-1.0, -0.5]], dtype=F64)
    y0 = torch.tensor([1.0, 0.0], dtype=F64)

    def solve(y, t0, stop_after=None, **resume):
        steps = []

        def on_accept(info):
            steps.append((info.t1, info.y1))
            return len(steps) == stop_after

        result = integrate(lambda t, y: y @ a.T, y, t0, 3.0, (), DOPRI5, controller=PIController(1e-8, 1e-10),
                           on_accept=on_accept, **resume)
        return result, steps

    _, whole = solve(y0, 0.0)
    head, _ = solve(y0, 0.0, stop_after=5)
    assert head.t_end == whole[4][0] and len(whole) > 10
    _, rest = solve(head.y_end, head.t_end, first_step=head.h_next, controller_state=head.controller_state,
                    f0=head.f_end)
    assert [t for t, _ in rest] == [t for t, _ in whole[5:]]
    assert all(torch.equal(y, z) for (_, y), (_, z) in zip(rest, whole[5:]))


def test_a_fixed_grid_steps_on_every_grid_point_and_every_landing():
    seen = []
    integrate(lambda t, y: -y, torch.ones(1, dtype=F64), 0.0, 1.0, (1.0,), RK4, grid=[0.25, 0.5, 0.75, 1.0],
              landings=[Landing(0.6), Landing(0.0), Landing(2.0)], on_accept=lambda info: seen.append(info.t1))
    assert seen == [0.25, 0.5, 0.6, 0.75, 1.0]


class EveryOtherAttempt:
    """A stub StepSizeController: steps of 0.1 (cut short at a landing), each rejected once
    before it is accepted. The loop must take exactly the steps it is told to."""

    adaptive = False

    def __init__(self):
        self.h, self.state, self.attempts = 0.1, 1.0, []

    def start(self, f, t, y, f0):
        pass

    def end_of_step(self, s, stop, t):
        return min(s + self.h, stop)

    def judge(self, step, y0, s, s1, t):
        self.attempts.append((s, s1))
        return len(self.attempts) % 2 == 0


def test_the_loop_takes_the_steps_its_step_size_controller_chooses():
    stub, seen, landed = EveryOtherAttempt(), [], []
    result = integrate(lambda t, y: -y, torch.ones(1, dtype=F64), 0.0, 1.0, (), RK4, controller=stub,
                       landings=[Landing(0.35, [lambda t, y: landed.append(t)])],
                       on_accept=lambda info: seen.append((info.t0, info.t1)))
    assert landed == [0.35] and seen[3] == (0.30000000000000004, 0.35) and seen[-1][1] == 1.0
    assert stub.attempts[1::2] == seen and stub.attempts[0::2] == seen  # each step tried twice, the same
    stats = result.stats
    assert stats["steps"] == 2 * stats["accepted"] == 2 * len(seen) and stats["rejected"] == len(seen)
    # rk4: f at the start of each accepted step (a rejected retry reuses it), three more stages per attempt.
    assert stats["nfe"] == len(seen) + 3 * stats["steps"]
