"""FusedMuon against torch.optim.Muon (Muon groups) and torch.optim.AdamW (``use_muon=False``
groups): 7 steps, params and all state compared; the momentum buffers bit for bit, the params
within the noise of bf16 Newton–Schulz (``fusedopt.tolerance.MUON_TOLERANCE``)."""

from __future__ import annotations

import pytest
import torch
from helpers import CountOps, record_launches
from torch import nn

import fusedopt
from fusedopt import FusedMuon, muon_param_groups
from fusedopt.kernels import muon as muon_kernels
from fusedopt.kernels.optimizer import optimizer_kernel, prepare_kernel
from fusedopt.optim import muon as muon_module
from fusedopt.optim._muon_dist import newton_schulz_cost, owners
from fusedopt.testing import MUON_CASES, assert_close, compare_muon, gpt_shapes
from fusedopt.tolerance import MUON_TOLERANCE

pytest.importorskip("torch.optim._muon")

SHAPES = [(8, 16), (16, 8), (8, 16), (5, 33), (12, 12)]  # wide, tall, a repeated shape, odd, square


def _close(a: torch.Tensor, b: torch.Tensor, what: str, exact: bool = False) -> None:
    """Bit for bit for ``exact`` values (the momentum buffers: no matmul touches them), else
    within the noise of bf16 Newton–Schulz (``MUON_TOLERANCE``: batched matmuls round an element
    of the update differently now and then)."""
    if exact:
        assert torch.equal(a, b), what
    else:
        assert_close(a, b, what, MUON_TOLERANCE)


def _params(shapes, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]


def _run(ours, theirs, ps, qs, steps=7, skip=None):
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for i, (p, q) in enumerate(zip(ps, qs, strict=True)):
            if skip is not None and i == skip and step % 2:
                p.grad = q.grad = None  # a param without a grad this step
                continue
            g = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()


OPTIONS = {
    "defaults": {},
    "plain_momentum": dict(nesterov=False, momentum=0.9),
    "no_decay_rms": dict(weight_decay=0.0, adjust_lr_fn="match_rms_adamw"),
    "original": dict(adjust_lr_fn="original", lr=0.05, ns_steps=3, eps=1e-5),
    "tensor_lr": dict(lr=torch.tensor(0.02)),
}


@pytest.fixture
def torch_muon_without_aliasing(monkeypatch):
    """torch's Muon, its Newton–Schulz given a copy: for a bf16 param without Nesterov its
    ``grad.bfloat16()`` is the momentum buffer itself, which its ``div_`` then rescales in place
    (:func:`test_torch_rescales_a_bf16_momentum_buffer_in_place`); ours does not."""
    module = torch.optim._muon
    original = module._zeropower_via_newtonschulz
    monkeypatch.setattr(module, "_zeropower_via_newtonschulz", lambda g, *args: original(g.clone(), *args))


def test_torch_rescales_a_bf16_momentum_buffer_in_place():
    """The torch behaviour FusedMuon does not copy: the buffer should be 0.1 * 2 after a step."""
    results = []
    for cls in (torch.optim.Muon, FusedMuon):
        p = torch.ones(4, 4, dtype=torch.bfloat16)
        p.grad = torch.full((4, 4), 2.0, dtype=torch.bfloat16)
        opt = cls([p], lr=0.02, nesterov=False, momentum=0.9)
        opt.step()
        results.append(opt.state[p]["momentum_buffer"][0, 0].item())
    assert results == [0.25, 0.2001953125]  # torch's divided by its norm (0.8); ours bf16(0.2)


@pytest.fixture(params=["kernels", "torch_ops"])
def path(request, monkeypatch):
    """The step's two paths: the Triton kernels (CUDA, or the interpreter here), and torch's ops
    (a CPU without the interpreter), forced by hiding Triton from FusedMuon."""
    if request.param == "torch_ops":
        monkeypatch.setattr(muon_module, "runs_triton", lambda device: False)
    return request.param


@pytest.mark.parametrize("options", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_muon_groups_match_torch(options, dtype, device, path, torch_muon_without_aliasing):
    ps = _params(SHAPES, dtype, device)
    qs = [p.clone() for p in ps]
    kwargs = OPTIONS[options]
    ours = FusedMuon(ps, **kwargs)
    theirs = torch.optim.Muon(
        qs, **{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    )
    _run(ours, theirs, ps, qs, skip=1)
    for i, (p, q) in enumerate(zip(ps, qs, strict=True)):
        _close(p, q, f"param {i}")
        _close(
            ours.state[p]["momentum_buffer"],
            theirs.state[q]["momentum_buffer"],
            f"momentum_buffer {i}",
            exact=True,
        )
        assert ours.state[p].keys() == theirs.state[q].keys()
    assert [g.keys() for g in ours.state_dict()["param_groups"]] == [
        g.keys() for g in theirs.state_dict()["param_groups"]
    ]


def test_adamw_groups_match_torch_adamw(device):
    """A ``use_muon=False`` group of any shapes is AdamW's step: its own lr, betas, eps and
    weight decay, and missing keys from FusedMuon's defaults (betas (0.9, 0.95), eps 1e-7,
    weight_decay 0.1)."""
    hidden = _params([(8, 16), (16, 8)], torch.float32, device)
    other = _params([(16,), (4, 3, 2), (7, 5)], torch.float32, device, seed=2)
    ps = hidden + other
    qs = [p.clone() for p in ps]
    ours = FusedMuon(
        [{"params": hidden}, {"params": other[:2], "use_muon": False, "lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-8,
          "weight_decay": 0.01}, {"params": other[2:], "use_muon": False}], lr=0.02,
    )  # fmt: skip
    muon = torch.optim.Muon(qs[:2], lr=0.02)
    adamw = torch.optim.AdamW(qs[2:4], lr=3e-3, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.01)
    adamw_defaults = torch.optim.AdamW(qs[4:], lr=0.02, betas=(0.9, 0.95), eps=1e-7, weight_decay=0.1)

    class Both:
        def step(self):
            for opt in (muon, adamw, adamw_defaults):
                opt.step()

    _run(ours, Both(), ps, qs)
    for i, (p, q) in enumerate(zip(ps, qs, strict=True)):
        _close(p, q, f"param {i}")
    for p, q, opt in zip(other, qs[2:], [adamw, adamw, adamw_defaults], strict=True):
        assert ours.state[p].keys() == opt.state[q].keys() == {"step", "exp_avg", "exp_avg_sq"}
        for key in ("step", "exp_avg", "exp_avg_sq"):
            _close(ours.state[p][key], opt.state[q][key], key)
    assert ours.param_groups[2]["betas"] == (0.9, 0.95) and ours.param_groups[2]["use_muon"] is False
    assert "use_muon" not in ours.param_groups[0] and "betas" not in ours.param_groups[0]


def test_state_dict_both_ways():
    ps = _params(SHAPES, torch.float32, "cpu")
    qs = [p.clone() for p in ps]
    ours, theirs = FusedMuon(ps, lr=0.02), torch.optim.Muon(qs, lr=0.02)
    _run(ours, theirs, ps, qs, steps=3)
    # torch's state into ours, ours into torch: both continue as one
    ours2, theirs2 = FusedMuon(ps, lr=0.5), torch.optim.Muon(qs, lr=0.5)
    ours2.load_state_dict(theirs.state_dict())
    theirs2.load_state_dict(ours.state_dict())
    assert ours2.param_groups[0]["lr"] == theirs2.param_groups[0]["lr"] == 0.02
    _run(ours2, theirs2, ps, qs, steps=4)
    for p, q in zip(ps, qs, strict=True):
        _close(p, q, "param")
        _close(ours2.state[p]["momentum_buffer"], theirs2.state[q]["momentum_buffer"], "buffer", exact=True)


def test_flatten_orthogonalizes_the_matrix_view():
    """A conv weight with ``flatten=True`` steps as torch's Muon steps its ``[out, -1]`` matrix."""
    conv = _params([(4, 3, 3, 3)], torch.float32, "cpu")
    flat = [conv[0].reshape(4, 27).clone()]
    ours, theirs = FusedMuon(conv, lr=0.02, flatten=True), torch.optim.Muon(flat, lr=0.02)
    gen = torch.Generator().manual_seed(3)
    for _ in range(7):
        g = torch.randn(4, 3, 3, 3, generator=gen)
        conv[0].grad, flat[0].grad = g.clone(), g.reshape(4, 27).clone()
        ours.step()
        theirs.step()
    _close(conv[0].reshape(4, 27), flat[0], "param")
    assert torch.equal(
        ours.state[conv[0]]["momentum_buffer"].reshape(4, 27), theirs.state[flat[0]]["momentum_buffer"]
    )


def test_max_grad_norm_is_torchs_clip_then_step():
    ps = _params(SHAPES, torch.float32, "cpu")
    qs = [p.clone() for p in ps]
    ours, theirs = FusedMuon(ps, lr=0.02, max_grad_norm=0.5), torch.optim.Muon(qs, lr=0.02)

    class Clipped:
        def step(self):
            torch.nn.utils.clip_grad_norm_(qs, 0.5)
            theirs.step()

    _run(ours, Clipped(), ps, qs, steps=3)
    grads = [p.grad for p in ps]
    for p, q in zip(ps, qs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-2, atol=1e-4)  # bf16 Newton–Schulz of a rescaled input
    assert all(g.abs().max() > 0.5 for g in grads), "the grads themselves are not rewritten"


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=-1.0), dict(momentum=-0.1), dict(weight_decay=-1.0), dict(adjust_lr_fn="other"),
     dict(lr=torch.tensor([0.1, 0.2]))],
    ids=["lr", "momentum", "weight_decay", "adjust_lr_fn", "tensor_lr"],
)  # fmt: skip
def test_constructor_errors_are_torchs(kwargs):
    with pytest.raises(ValueError) as theirs:
        torch.optim.Muon([torch.zeros(2, 2)], **kwargs)
    with pytest.raises(ValueError) as ours:
        FusedMuon([torch.zeros(2, 2)], **kwargs)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4)])
def test_muon_group_shapes_are_torchs(shape):
    for cls in (torch.optim.Muon, FusedMuon):
        with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
            cls([torch.zeros(shape)])
    FusedMuon([{"params": [torch.zeros(shape)], "use_muon": False}])  # AdamW groups: any shape
    if len(shape) > 2:
        FusedMuon([torch.zeros(shape)], flatten=True)


def test_adamw_group_errors_are_adamws():
    with pytest.raises(ValueError, match=r"Invalid beta parameter at index 1: 1\.5"):
        FusedMuon([{"params": [torch.zeros(3)], "use_muon": False, "betas": (0.9, 1.5)}])
    with pytest.raises(ValueError, match="Invalid epsilon value: -1"):
        FusedMuon([{"params": [torch.zeros(3)], "use_muon": False, "eps": -1.0}])


@pytest.mark.parametrize(
    "kwargs", [dict(ns_steps=100), dict(ns_coefficients=(1.0, 2.0))], ids=["steps", "coefficients"]
)
def test_step_errors_are_torchs(kwargs):
    messages = []
    for cls in (torch.optim.Muon, FusedMuon):
        p = torch.zeros(2, 2, requires_grad=True)
        p.grad = torch.ones(2, 2)
        with pytest.raises(ValueError) as err:
            cls([p], **kwargs).step()
        messages.append(str(err.value))
    assert messages[0] == messages[1]


class _TinyGPT(nn.Module):
    def __init__(self, vocab=50, d=16, tied=True):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"ln": nn.LayerNorm(d), "qkv": nn.Linear(d, 3 * d), "proj": nn.Linear(d, d)})
            for _ in range(2)
        )
        self.conv = nn.Conv1d(d, d, 3)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight


@pytest.mark.parametrize("tied", [True, False])
def test_muon_param_groups_split_a_model(tied):
    model = _TinyGPT(tied=tied)
    groups = muon_param_groups(model, lr=3e-4)
    muon, adamw = groups
    hidden = [m.weight for b in model.blocks for m in (b["qkv"], b["proj"])]
    assert [id(p) for p in muon["params"]] == [id(p) for p in hidden]
    assert adamw["use_muon"] is False and adamw["lr"] == 3e-4
    others = {id(p) for p in adamw["params"]}
    assert (
        id(model.wte.weight) in others
        and id(model.lm_head.weight) in others
        and id(model.conv.weight) in others
    )
    assert len(others) + len(hidden) == len(list(model.parameters()))
    flat = muon_param_groups(model, flatten=True)
    assert id(model.conv.weight) in {id(p) for p in flat[0]["params"]}
    opt = fusedopt.FusedMuon(flat, flatten=True, lr=0.02)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()


def test_copies_keep_the_extensions():
    """Copies carry ``max_grad_norm`` and ``flatten``; ``load_state_dict`` (groups and state
    only) keeps the loading optimizer's own."""
    import copy
    import pickle

    opt = FusedMuon([torch.zeros(2, 3, 4)], max_grad_norm=1.5, flatten=True)
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert other.max_grad_norm == 1.5 and other.flatten is True
    loaded = FusedMuon([torch.zeros(2, 3, 4)], max_grad_norm=0.5, flatten=True)
    loaded.load_state_dict(opt.state_dict())
    assert loaded.max_grad_norm == 0.5 and loaded.flatten is True


@pytest.mark.parametrize("unscale_first", [False, True], ids=["step", "unscale_then_step"])
def test_grad_scaler_as_with_torchs_muon(unscale_first):
    """torch.amp.GradScaler: our step unscales and skips (an inf at step 2) as GradScaler does
    for torch's Muon, which unscales the grads in place; the scaler's scale follows alike."""
    ps = _params(SHAPES, torch.float32, "cpu")
    qs = [p.clone() for p in ps]
    runs = []
    for opt, leaves in ((FusedMuon(ps, lr=0.02), ps), (torch.optim.Muon(qs, lr=0.02), qs)):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
        gen = torch.Generator().manual_seed(1)
        for step in range(5):
            scale = scaler.scale(torch.ones(()))  # the scale a scaled loss would carry
            for p in leaves:
                p.grad = torch.randn(p.shape, generator=gen) * scale
            if step == 2:
                leaves[0].grad[0, 0] = float("inf")
            if unscale_first:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        runs.append((scaler.get_scale(), [opt.state[p]["momentum_buffer"] for p in leaves]))
    assert runs[0][0] == runs[1][0]
    for p, q, a, b in zip(ps, qs, runs[0][1], runs[1][1], strict=True):
        _close(p, q, "param")
        _close(a, b, "momentum_buffer", exact=True)


def test_dtensor_params_on_one_rank():
    """DTensor params in a Muon group (a 1-rank gloo mesh; 2 ranks: tests/test_distributed.py):
    ``Shard(0)`` (2-D, and 3-D with flatten) and ``Replicate()`` step as plain tensors, bit for
    bit, their momentum buffers DTensors placed as them. Other placements are refused when the
    group is added (an AdamW group holds any); a grad placed unlike its param at the step,
    before anything changes."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        mesh = init_device_mesh("cpu", (1,))
        values = _params([(4, 6), (5, 2, 3), (6, 4)], torch.float32, "cpu")
        placements = [[Shard(0)], [Shard(0)], [Replicate()]]
        ds = [nn.Parameter(distribute_tensor(v, mesh, x)) for v, x in zip(values, placements, strict=True)]
        ps = [nn.Parameter(v.clone()) for v in values]
        ours, theirs = (FusedMuon(params, lr=0.02, flatten=True) for params in (ds, ps))
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for d, p in zip(ds, ps, strict=True):
                p.grad = torch.randn(p.shape, generator=gen)
                d.grad = distribute_tensor(p.grad.clone(), mesh, d.placements)
            ours.step()
            theirs.step()
        for d, p in zip(ds, ps, strict=True):
            buf = ours.state[d]["momentum_buffer"]
            assert buf.placements == d.placements and torch.equal(
                buf.to_local(), theirs.state[p]["momentum_buffer"]
            )
            assert torch.equal(d.to_local(), p.detach())
        for x in ([Shard(1)], [Shard(2)]):
            w = nn.Parameter(distribute_tensor(torch.randn(4, 6, 2), mesh, x))
            with pytest.raises(NotImplementedError, match="placements"):
                FusedMuon([w], flatten=True)
            FusedMuon([{"params": [w], "use_muon": False}])
        ds[0].grad = distribute_tensor(torch.randn(4, 6), mesh, [Replicate()])
        before = [t.to_local().clone() for t in (*ds, *(ours.state[d]["momentum_buffer"] for d in ds))]
        with pytest.raises(RuntimeError, match="placements"):
            ours.step()
        after = [t.to_local() for t in (*ds, *(ours.state[d]["momentum_buffer"] for d in ds))]
        assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    finally:
        dist.destroy_process_group()


def test_owners_balance_newton_schulz_cost():
    """Largest cost first onto the least-loaded rank, ties to the first matrix and the lowest
    rank: the same answer on every rank, and within 4/3 of the best (the greedy's bound)."""
    assert owners([5, 3, 3, 2, 1], 2) == [0, 1, 1, 0, 1]
    assert owners([1, 1, 1, 1], 2) == [0, 1, 0, 1]
    assert owners([4], 3) == [0] and owners([], 2) == []
    assert newton_schulz_cost((8, 12)) == newton_schulz_cost((12, 8)) == 8 * 8 * (2 * 12 + 8)
    gen = torch.Generator().manual_seed(0)
    costs = [newton_schulz_cost(torch.randint(1, 64, (2,), generator=gen).tolist()) for _ in range(40)]
    for world in (2, 3, 8):
        ranks = owners(costs, world)
        loads = [sum(c for c, r in zip(costs, ranks, strict=True) if r == rank) for rank in range(world)]
        best = max(sum(costs) / world, max(costs))  # no assignment does better
        assert max(loads) <= 4 / 3 * best and owners(costs, world) == ranks


@pytest.mark.parametrize("case", MUON_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_check_cases_pass(case, dtype):
    """``fusedopt check``'s Muon rows (a GPT layout: hidden matrices in the Muon group, the
    rest in an AdamW group) on this machine."""
    shapes = gpt_shapes(16, 2, 97)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(dtype) for _, s in shapes]

    def grads(ps, step):
        return [torch.randn(p.shape, generator=gen).to(dtype) for p in ps]

    result = compare_muon(case, params, grads, 5, [n for n, _ in shapes])
    assert result.verdict == "PASS", (result.worst, result.notes)


@pytest.mark.parametrize("n", [2, 6])
def test_launches_do_not_grow_with_the_matrices(n, monkeypatch):
    """One step of a Muon group of ``n`` matrices of two shapes and an AdamW group of ``n``
    vectors: the same launches for 2 and 6 (momentum, norms, update; AdamW's; per shape 3
    batched matmuls per Newton–Schulz step)."""
    ps = _params([(8, 16), (12, 8)] * (n // 2), torch.float32, "cpu")
    vs = _params([(5,)] * n, torch.float32, "cpu", seed=1)
    opt = FusedMuon([{"params": ps}, {"params": vs, "use_muon": False}], lr=0.02, ns_steps=4)
    for t in ps + vs:
        t.grad = torch.ones_like(t)
    opt.step()  # the first step builds the plans
    launches = record_launches(monkeypatch, {
        "momentum": muon_kernels.muon_momentum_kernel, "norms": muon_kernels.muon_norms_kernel,
        "update": muon_kernels.muon_update_kernel, "adamw": optimizer_kernel, "prepare": prepare_kernel,
    })  # fmt: skip
    with CountOps() as ops:
        opt.step()
    counts = launches.counts
    assert {k: counts.get(k, 0) for k in ("momentum", "norms", "update", "adamw")} == dict.fromkeys(
        ("momentum", "norms", "update", "adamw"), 1
    )
    assert counts.keys() <= {"momentum", "norms", "update", "adamw", "prepare"}
    matmuls = {op: ops.ops.count(f"aten.{op}.default") for op in ("bmm", "baddbmm", "mm", "addmm")}
    assert matmuls == {"bmm": 2 * 4, "baddbmm": 2 * 2 * 4, "mm": 0, "addmm": 0}


def test_no_host_read_in_a_kernel_step(monkeypatch):
    """GradScaler's verdict, its scale, max_grad_norm's coefficient and a tensor lr stay on the
    device (a CUDA graph could capture the step): no tensor is read as a number during a step,
    and an inf skips it, Muon and AdamW groups alike."""
    ps = _params(SHAPES, torch.float32, "cpu")
    vs = _params([(7,)], torch.float32, "cpu", seed=1)
    opt = FusedMuon(
        [{"params": ps}, {"params": vs, "use_muon": False}], lr=torch.tensor(0.02), max_grad_norm=1.0
    )
    for t in ps + vs:
        t.grad = torch.randn_like(t)
    opt.step()  # plans built
    before = [t.clone() for t in ps + vs]
    state = [(p, k, v.clone()) for p in ps + vs for k, v in opt.state[p].items()]

    def refuse(self, *args):
        raise AssertionError("a host read in the step")

    for name in ("item", "__bool__", "tolist", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(1.0)
    opt.step()
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(before, ps + vs, strict=True)), (
        "a skipped step changed a param"
    )
    assert all(torch.equal(v, opt.state[p][k]) for p, k, v in state), "a skipped step changed the state"


def test_params_the_kernels_do_not_walk(device):
    """A transposed (non-contiguous) matrix steps with torch's ops beside the kernels' matrices,
    in the same group and step: the same result as torch's Muon."""
    base = _params([(16, 8), (8, 16)], torch.float32, device)
    ps = [base[0].T.contiguous().T.requires_grad_(False), base[1]]  # param 0: a transposed layout
    assert not ps[0].is_contiguous()
    qs = [p.detach().clone() for p in ps]
    ours, theirs = FusedMuon(ps, lr=0.02), torch.optim.Muon(qs, lr=0.02)
    _run(ours, theirs, ps, qs)
    for i, (p, q) in enumerate(zip(ps, qs, strict=True)):
        _close(p, q, f"param {i}")
        _close(ours.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"], "buffer", exact=True)


def test_adamw_groups_resume_from_a_state_dict():
    """The AdamW groups' state lives in FusedMuon's ``state`` (shared with the FusedAdamW step
    over them): saved mid-run and loaded into a new FusedMuon (and a state dict replaced under a
    running one), training goes on as without the interruption."""
    import copy

    shapes = [(8, 16), (16, 8), (7,), (3, 4, 2)]

    def build(ps):
        return FusedMuon([{"params": ps[:2]}, {"params": ps[2:], "use_muon": False, "lr": 0.01}], lr=0.02)

    ps, qs, rs = (_params(shapes, torch.float32, "cpu") for _ in range(3))
    whole = build(ps)
    first, reloaded = build(qs), build(rs)
    gen = torch.Generator().manual_seed(4)
    for step in range(6):
        grads = [torch.randn(p.shape, generator=gen) for p in ps]
        if step == 3:
            for r, q in zip(rs, qs, strict=True):
                r.copy_(q)
            saved = copy.deepcopy(first.state_dict())  # as torch.save / torch.load give it
            reloaded.load_state_dict(saved)
            first.load_state_dict(copy.deepcopy(saved))  # replaced under a running optimizer
        for opt, leaves in ((whole, ps), (first, qs), (reloaded, rs)):
            for p, g in zip(leaves, grads, strict=True):
                p.grad = g.clone()
            if opt is not reloaded or step >= 3:
                opt.step()
    for p, q, r in zip(ps, qs, rs, strict=True):
        assert torch.equal(p, q) and torch.equal(p, r)
    for key in ("step", "exp_avg", "exp_avg_sq"):
        assert torch.equal(whole.state[ps[2]][key], reloaded.state[rs[2]][key]), key
    assert reloaded.state[rs[2]].keys() == {"step", "exp_avg", "exp_avg_sq"}
    assert reloaded.state[rs[0]].keys() == {"momentum_buffer"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_captured_step_replays_as_the_eager_one():
    """On CUDA the step makes no host read once its tables exist: captured in a CUDA graph, its
    replays (new grads copied into the captured grad buffers, a tensor lr changed in place)
    equal the eager steps of a twin optimizer."""
    shapes = [(64, 128), (128, 64), (64, 128), (33, 17)]
    ps, qs = (_params(shapes, torch.bfloat16, "cuda") for _ in range(2))
    vs, ws = (_params([(7,)], torch.float32, "cuda", seed=1) for _ in range(2))
    lr, lr2 = torch.tensor(0.02, device="cuda"), torch.tensor(0.02, device="cuda")

    def make(ms, xs, lr):
        return FusedMuon([{"params": ms}, {"params": xs, "use_muon": False}], lr=lr, max_grad_norm=1.0)

    graphed, eager = make(ps, vs, lr), make(qs, ws, lr2)
    for t in ps + vs + qs + ws:
        t.grad = torch.zeros_like(t)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # state and tables built (zero grads: the params only decay)
            graphed.step()
            eager.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    gen = torch.Generator(device="cuda").manual_seed(0)
    for step in range(4):
        for p, q in zip(ps + vs, qs + ws, strict=True):
            g = torch.randn(p.shape, generator=gen, device="cuda").to(p.dtype)
            p.grad.copy_(g)
            q.grad.copy_(g)
        lr.fill_(0.02 / (step + 1))
        lr2.fill_(0.02 / (step + 1))
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    for p, q in zip(ps + vs, qs + ws, strict=True):
        assert torch.equal(p, q)


def test_compiled_step_is_the_eager_step():
    """``torch.compile(opt.step)`` runs the step eagerly (a graph break around it): the same
    params and state as the eager optimizer, AdamW groups included."""
    shapes = [(8, 16), (16, 8), (5,)]
    ps, qs = _params(shapes, torch.float32, "cpu"), _params(shapes, torch.float32, "cpu")

    def build(ts):
        return FusedMuon(
            [{"params": ts[:2]}, {"params": ts[2:], "use_muon": False}], lr=0.02, max_grad_norm=1.0
        )

    compiled, eager = build(ps), build(qs)
    step = torch.compile(compiled.step)
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        for p, q in zip(ps, qs, strict=True):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        step()
        eager.step()
    for p, q in zip(ps, qs, strict=True):
        assert torch.equal(p, q)
        assert all(torch.equal(compiled.state[p][k], eager.state[q][k]) for k in eager.state[q])
