"""lipschitz.optim: tests written to kill mutants that survived tests/test_optim.py and
tests/test_distributed.py (docs/testing.md).

The split of the matrix work across ranks (distribute) is exercised here in one process: two
threads play rank 0 and rank 1 of a fake process group whose collectives exchange tensors
through a barrier, so the ownership, the all-gather, the warm-start sync and the process group
argument are all checked without torchrun. References: a run of the same steps without
distribute, and assignments worked out by hand from assign_ranks' documented greedy rule.
"""

import copy
import math
import threading
import warnings

import pytest
import torch
from torch import nn

from lipschitz.constraints import SOFT_CAP_MAX_K
from lipschitz.linalg import NS_MAX_OUTPUT
from lipschitz.optim import (
    Muon,
    assign_ranks,
    constrain,
    constraint_violations,
    distribute,
    matrix_cost,
    sync_constraint_state,
    work_counts,
)
from lipschitz.optim.muon import UPDATE_NORM_MARGIN
from lipschitz.optim.projection import post_step_of

# ----------------------------------------------------------------------------- assign_ranks


def test_matrix_cost_is_gram_products():
    # n_matrices · out · in · min(out, in), by hand
    assert matrix_cost((12, 8)) == 12 * 8 * 8
    assert matrix_cost((3, 5, 40)) == 3 * 5 * 40 * 5


def test_assign_ranks_greedy_worked_by_hand():
    # costs 64, 4096, 512, 4096, 64: decreasing cost, ties in order -> 1, 3, 2, 0, 4; each to
    # the least loaded rank, ties to the lowest: 1->0, 3->1, 2->0 (loads 4096 = 4096),
    # 0->1 (4608 > 4096), 4->1 (4608 > 4160).
    shapes = [(4, 4), (16, 16), (8, 8), (16, 16), (4, 4)]
    assert assign_ranks(shapes, 2) == [1, 0, 0, 1, 1]
    # a cheap weight listed first must not be placed first: ascending order would put it alone
    assert assign_ranks([(2, 2), (16, 16), (16, 16), (16, 16)], 2) == [1, 0, 1, 0]
    assert assign_ranks([(16, 16)], 3) == [0]


# ------------------------------------------------------------------- a fake 2-rank world


class FakeWorld:
    """torch.distributed's collectives for `n` threads of one process (thread = rank)."""

    def __init__(self, n: int, group: object) -> None:
        self.n, self.group = n, group
        self.barrier = threading.Barrier(n, timeout=60)
        self.slots: list = [None] * n
        self.local = threading.local()
        self.groups: list = []

    def _exchange(self, obj):
        self.barrier.wait()
        self.slots[self.local.rank] = obj
        self.barrier.wait()
        got = list(self.slots)
        self.barrier.wait()
        return got

    def get_rank(self, group=None):
        self.groups.append(group)
        return self.local.rank

    def get_world_size(self, group=None):
        self.groups.append(group)
        return self.n

    def all_gather(self, out, tensor, group=None):
        self.groups.append(group)
        for o, t in zip(out, self._exchange(tensor.clone()), strict=True):
            o.copy_(t)

    def all_gather_object(self, out, obj, group=None):
        self.groups.append(group)
        out[:] = copy.deepcopy(self._exchange(obj))


SHAPES = {"E": (10, 8), "W1": (12, 8), "W2": (8, 12), "W3": (8, 8), "H": (5, 8)}
STEPS = 3


def _optimizer(params: dict) -> Muon:
    return Muon(
        [
            {"params": [params["E"]], "rule": "embedding", "constraint": "row_rms_cap",
             "w_max": 0.5},
            {"params": [params["W1"], params["W2"], params["W3"]],
             "constraint": "spectral_normalize", "w_max": 0.8},
            {"params": [params["H"]]},  # rule "matrix", no constraint: still split
        ],
        lr=0.3,
        coefficients="you6",
    )  # fmt: skip


def _params() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {k: nn.Parameter(torch.randn(s, generator=gen)) for k, s in SHAPES.items()}


def _run(params: dict, opt: Muon) -> None:
    gen = torch.Generator().manual_seed(1)  # the same (averaged) gradients on every rank
    for _ in range(STEPS):
        for k, p in params.items():
            p.grad = torch.randn(SHAPES[k], generator=gen)
        opt.step()


def _two_ranks(monkeypatch, world: FakeWorld):
    import torch.distributed as dist

    for name in ("get_rank", "get_world_size", "all_gather", "all_gather_object"):
        monkeypatch.setattr(dist, name, getattr(world, name))
    results: list = [None, None]
    errors: list = []

    def rank(r: int) -> None:
        try:
            world.local.rank = r
            params = _params()
            opt = distribute(_optimizer(params), process_group=world.group)
            _run(params, opt)
            sync_constraint_state(opt)
            results[r] = (params, opt)
        except BaseException as err:  # re-raised in the main thread
            errors.append(err)
            world.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_two_ranks_step_like_one_and_split_the_work(monkeypatch):
    params = _params()
    alone = _optimizer(params)
    _run(params, alone)

    group = object()  # a process group other than the default one
    world = FakeWorld(2, group)
    (p0, opt0), (p1, opt1) = _two_ranks(monkeypatch, world)
    assert world.groups and all(g is group for g in world.groups)
    for k in SHAPES:  # every rank ends with the single process's weights
        torch.testing.assert_close(p0[k].detach(), params[k].detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(p1[k].detach(), params[k].detach(), rtol=1e-6, atol=1e-6)
    # embedding rows inside their ball on both ranks (row cap: not split, done by every rank)
    for p in (p0["E"], p1["E"]):
        assert p.detach().square().mean(-1).sqrt().max() <= 0.5 * (1 + 1e-6)

    # ownership by hand: matrix-work weights W1, W2, W3, H cost 768, 768, 512, 200 -> ranks
    # 0, 1, 0 (tie: lowest), 1. msign: W1, W3 on rank 0; W2, H on rank 1. Projections
    # (spectral_normalize): W1, W3 on rank 0, W2 on rank 1; the row cap is not counted.
    assert work_counts(alone) == {"msign": 4 * STEPS, "projections": 3 * STEPS}
    assert work_counts(opt0) == {"msign": 2 * STEPS, "projections": 2 * STEPS}
    assert work_counts(opt1) == {"msign": 2 * STEPS, "projections": 1 * STEPS}

    # after sync_constraint_state every rank holds every owner's warm start
    for k in ("W1", "W2", "W3"):
        b0 = opt0.state[p0[k]]["constraint"]["basis"]
        b1 = opt1.state[p1[k]]["constraint"]["basis"]
        assert torch.equal(b0, b1), k
        ref = alone.state[params[k]]["constraint"]["basis"]
        torch.testing.assert_close(b0[..., 0].abs(), ref[..., 0].abs(), rtol=1e-4, atol=1e-4)


def test_distribute_splits_constrained_groups_of_other_optimizers(monkeypatch):
    # An optimizer without has_matrix_work (SGD): the weights of matrix constraints are split,
    # not those of "none" or of a per-row constraint.
    world = FakeWorld(2, None)
    world.local.rank = 0
    import torch.distributed as dist

    monkeypatch.setattr(dist, "get_rank", world.get_rank)
    monkeypatch.setattr(dist, "get_world_size", world.get_world_size)
    a, b, c, d = (nn.Parameter(torch.randn(6, 4)) for _ in range(4))
    opt = constrain(
        torch.optim.SGD(
            [
                {"params": [a], "constraint": "svd_cap", "w_max": 1.0},
                {"params": [b]},
                {"params": [c], "constraint": "row_rms_cap", "w_max": 1.0},
                {"params": [d], "constraint": "spectral_hard_cap", "w_max": 1.0},
            ],
            lr=0.1,
        )
    )
    distribute(opt)
    assert [id(p) for p in post_step_of(opt).shard.params] == [id(a), id(d)]
    with pytest.raises(ValueError, match=r"^distribute: this optimizer is already distributed$"):
        distribute(opt)
    with pytest.raises(ValueError, match=r"^distribute: call constrain\(optimizer\) first \(Muon"):
        distribute(torch.optim.SGD([nn.Parameter(torch.zeros(2, 2))], lr=0.1))


# ------------------------------------------------------------------- the soft cap's warning

# Muon's step_bound: update_norm = η·tn·NS_MAX_OUTPUT·UPDATE_NORM_MARGIN, decay = η·tn·λ. The
# soft cap absorbs k = w_max·(1 − decay) + update_norm up to (81/62)·w_max (soft_cap_alpha).
W_MAX, DECAY = 2.0, 0.2


def _soft_cap_muon(update_norm: float) -> tuple[Muon, nn.Parameter]:
    eta = update_norm / (NS_MAX_OUTPUT["you6"] * UPDATE_NORM_MARGIN)
    w = nn.Parameter(torch.randn(8, 4) * 0.1)
    opt = Muon([w], lr=eta, weight_decay=DECAY / eta, coefficients="you6",
               constraint="spectral_soft_cap", w_max=W_MAX)  # fmt: skip
    return opt, w


def _step(opt: Muon, w: nn.Parameter) -> list:
    w.grad = torch.randn(8, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    return caught


def test_soft_cap_warning_threshold_uses_decay_and_w_max():
    # k = 2·0.8 + 0.9 = 2.5 < (81/62)·2 = 2.613: inside the guarantee, no warning
    assert W_MAX * (1 - DECAY) + 0.9 < SOFT_CAP_MAX_K * W_MAX
    opt, w = _soft_cap_muon(0.9)
    assert _step(opt, w) == [] and _step(opt, w) == []
    # k = 1.6 + 1.1 = 2.7 > 2.613: one warning, only once, pointing above the package (the
    # caller's step(); not checked exactly: mutmut's trampolines add frames)
    opt, w = _soft_cap_muon(1.1)
    caught = _step(opt, w)
    assert len(caught) == 1 and not caught[0].filename.endswith("projection.py")
    assert str(caught[0].message).endswith("lower the learning rate")
    assert _step(opt, w) == []


def test_sync_constraint_state_skips_what_has_no_state(monkeypatch):
    # not constrained at all: a no-op
    sync_constraint_state(torch.optim.SGD([nn.Parameter(torch.zeros(2, 2))], lr=0.1))
    # distributed on one rank, one split weight never stepped (no optimizer state yet)
    world = FakeWorld(1, None)
    world.local.rank = 0
    import torch.distributed as dist

    for name in ("get_rank", "get_world_size", "all_gather", "all_gather_object"):
        monkeypatch.setattr(dist, name, getattr(world, name))
    a, b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(4, 4))
    opt = distribute(Muon([a, b], lr=0.1, constraint="spectral_normalize", w_max=1.0))
    a.grad = torch.randn(6, 4)
    opt.step()
    basis = opt.state[a]["constraint"]["basis"].clone()
    sync_constraint_state(opt)
    assert torch.equal(opt.state[a]["constraint"]["basis"], basis) and b not in opt.state


# ---------------------------------------------------------- projection: checks and reports


def test_constrain_refuses_bad_groups_with_their_whole_message():
    w = nn.Parameter(torch.zeros(4, 4))
    cases = [
        ({"constraint": "spectral_soft_cap", "w_max": 1.0},
         "constrain: spectral_soft_cap needs a bound on the norm of every step, and AdamW steps "
         "have none (an AdamW step can be arbitrarily large in the spectral norm). Use Muon, or a "
         "constraint that does not depend on the step: svd_cap, spectral_hard_cap, "
         "spectral_normalize."),
        ({"constraint": "svd_cap", "w_max": math.inf},
         "constrain: constraint 'svd_cap' needs a finite w_max > 0, got inf"),
        ({"constraint": "svd_cap", "w_max": 1.0, "constraint_kwargs": [("iters", 3)]},
         "constrain: constraint_kwargs must be a dict"),
        ({"constraint": "svd_cap", "w_max": 1.0, "param_names": ["a", "b"]},
         "constrain: a param group has 2 param_names for 1 parameters"),
        ({"constraint": "none", "param_names": []},
         "constrain: a param group has 0 param_names for 1 parameters"),
    ]  # fmt: skip
    for options, message in cases:
        with pytest.raises(ValueError) as err:
            constrain(torch.optim.AdamW([{"params": [w], **options}]))
        assert str(err.value) == message
    once = constrain(torch.optim.AdamW([w]))
    with pytest.raises(ValueError) as err:
        constrain(once)
    assert str(err.value) == "constrain: this optimizer already has its constraints installed"


def test_constraint_violations_never_trusts_a_known_norm_of_a_non_finite_weight():
    w = nn.Parameter(torch.ones(4, 4))
    opt = constrain(torch.optim.SGD([{"params": [w], "constraint": "svd_cap", "w_max": 1.0,
                                      "param_names": ["w"]}], lr=0.0))  # fmt: skip
    with torch.no_grad():
        w[0, 0] = float("inf")
    (found,) = constraint_violations(opt, known_norms={"w": 0.5})  # a stale measurement
    assert found["param"] == "w" and math.isnan(found["norm"])
    with torch.no_grad():
        w[0, 0] = 1.0  # finite again (norm 4): the known norm is used as it is
    assert constraint_violations(opt, known_norms={"w": 0.5}) == []
    assert constraint_violations(opt)[0]["norm"] == pytest.approx(4.0, rel=1e-12)


def test_soft_cap_warning_names_the_constraint():
    w = nn.Parameter(torch.zeros(8, 8))
    opt = Muon([w], lr=1.0, constraint="spectral_soft_cap", w_max=0.1)  # step ≫ what it absorbs
    w.grad = torch.randn(8, 8)
    with pytest.warns(UserWarning, match=r"^spectral_soft_cap: step norm "):
        opt.step()


# ----------------------------------------------------------------------------- Muon defaults


def test_muon_default_step_size_and_cap():
    # lr defaults to 0.02: the first step is lr·sqrt(out/in)·msign(m), whose RMS→RMS norm is
    # lr·σ(msign) ∈ lr·[0.99994, 1.0000001] with accurate8 (linalg.NS_COEFFICIENTS)
    from lipschitz.linalg import rms_operator_norm

    w = nn.Parameter(torch.randn(12, 6, dtype=torch.float64))
    before = w.detach().clone()
    opt = Muon([w], coefficients="accurate8", ns_dtype=torch.float64)
    w.grad = torch.randn(12, 6, dtype=torch.float64)
    opt.step()
    assert rms_operator_norm(w.detach() - before).item() == pytest.approx(0.02, rel=1e-4)
    # w_max defaults to 1: a constraint without w_max caps at RMS→RMS norm 1
    w = nn.Parameter(torch.randn(12, 6) * 5)
    opt = Muon([w], constraint="svd_cap")
    w.grad = torch.randn(12, 6)
    opt.step()
    assert rms_operator_norm(w).item() <= 1 + 1e-5


def test_muon_first_step_is_msign_in_its_ns_dtype():
    # Muon's first step without momentum history is W − lr·sqrt(out/in)·msign(g) (momentum
    # buffer (1−β)·g, nesterov off; msign is scale-free), computed in ns_dtype: bit for bit
    # the same as msign called directly in that dtype, and different from the float32 result
    from lipschitz.linalg import msign

    g = torch.randn(12, 6, generator=torch.Generator().manual_seed(3))
    for dtype in (torch.bfloat16, torch.float32):
        w = nn.Parameter(torch.zeros(12, 6))
        opt = Muon([w], lr=0.1, nesterov=False, coefficients="jordan5", ns_dtype=dtype)
        w.grad = g.clone()
        opt.step()
        expected = -0.1 * (12 / 6) ** 0.5 * msign(0.05 * g, "jordan5", dtype=dtype)
        assert torch.equal(w.detach(), expected), dtype
    assert not torch.equal(msign(g, "jordan5", dtype=torch.bfloat16), msign(g, "jordan5"))


def test_muon_passes_constraint_kwargs(monkeypatch):
    w = nn.Parameter(torch.randn(6, 5))
    opt = Muon([w], constraint="spectral_normalize", constraint_kwargs={"iters": 3})
    calls = []
    qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda A: calls.append(1) or qr(A))
    w.grad = torch.randn(6, 5)
    opt.step()
    assert len(calls) == 1 + 3  # one QR of the start block, one per iteration


@pytest.mark.parametrize("weight_decay", [0.0, 0.5, 1.0])
def test_muon_decay_with_a_zero_gradient(weight_decay):
    # msign(0) = 0, so only the decoupled decay acts: W ← W·(1 − λ·η·tn), by hand
    w = nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
    before = w.detach().clone()
    opt = Muon([w], lr=0.1, weight_decay=weight_decay, target_norm=2.0)
    w.grad = torch.zeros(5, 4, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(w.detach(), before * (1 - weight_decay * 0.1 * 2.0))


FLIP = r"lr·target_norm·weight_decay must be < 1 \(the decay would flip the weights\)"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"momentum_start": 1.0}, r"momentum_start must be in \[0, 1\), got 1.0"),
        ({"momentum_start": 1.5}, r"momentum_start must be in \[0, 1\), got 1.5"),
        ({"momentum_warmup_steps": -1}, "momentum_warmup_steps must be an int >= 0, got -1"),
        ({"momentum_warmup_steps": 2.5}, "momentum_warmup_steps must be an int >= 0, got 2.5"),
        ({"ns_dtype": torch.float16}, "ns_dtype must be one of .*, got torch.float16"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0, got -0.1"),
        ({"target_norm": 0.0}, "target_norm must be > 0, got 0.0"),
        ({"lr": 0.5, "target_norm": 2.0, "weight_decay": 1.0}, FLIP),  # product exactly 1
        ({"lr": 0.5, "target_norm": 4.0, "weight_decay": 0.6}, FLIP),  # 1.2
        ({"rule": "row"}, r"rule must be one of \('matrix', 'embedding'\), got 'row'"),
        ({"max_inflation": 0.5}, "max_inflation must be >= 1, got 0.5"),
    ],
)
def test_muon_refuses_bad_options_by_name(options, message):
    with pytest.raises(ValueError, match=f"^Muon: {message}$"):
        Muon([nn.Parameter(torch.zeros(3, 2))], **options)


def test_muon_accepts_the_ends_of_its_ranges():
    Muon([nn.Parameter(torch.zeros(3, 2))], momentum_start=0.0, momentum_warmup_steps=0)
    Muon([nn.Parameter(torch.zeros(3, 2))], max_inflation=1.0)
    Muon([nn.Parameter(torch.zeros(3, 2))], max_inflation=1.5)
    with pytest.raises(ValueError, match=r"Muon updates matrices: give vectors and scalars to "
                       r"AdamW \(see route_parameters\)$"):  # fmt: skip
        Muon([nn.Parameter(torch.zeros(3))])
