"""Muon against torch.optim.Muon (the same numbers on 2-D params), its AdamW groups against
catapult's and torch's AdamW, muon_param_groups, the batched Newton-Schulz against torch's
per-matrix one, and the package's extras (clip, skip_nonfinite, flatten) on every backend."""
import copy

import pytest
import torch
from torch import nn

from catapult_kernels.optim import AdamW, Muon, muon_param_groups
from catapult_kernels.optim.newton_schulz import SMALL, orthogonalize
from conftest import BACKEND_DEVICES
from training import STEPS, make_data

# The momentum and the step are torch's op for op, and so is Newton-Schulz for a large
# matrix on the CPU; small matrices of one shape (the two 16 x 16 here) take a batched chain,
# whose bmm may round a product one bfloat16 ulp (2^-8 relative) from torch's mm (seen on 1
# of 200 random pairs of 16 x 16 matrices). One such ulp moves that element of the update by
# lr * ratio * 2^-8 |u|: about 1e-4 of these params. Measured over these 20 steps: 0.
PARAM_RTOL = 1e-4


def matrices_model(seed=0):
    """Weights of every Muon case: square, wide, tall, one row, and two of one shape
    (batched together)."""
    torch.manual_seed(seed)
    return nn.ParameterList([nn.Parameter(torch.randn(*s) * 0.5) for s in
                             [(16, 16), (8, 24), (24, 8), (1, 12), (16, 16), (5, 7)]])


def run_matrices(model, opt, steps=STEPS, seed=1):
    g = torch.Generator().manual_seed(seed)
    targets = [torch.randn(p.shape, generator=g) for p in model]
    for _ in range(steps):
        opt.zero_grad()
        sum(((p - t) ** 2).sum() for p, t in zip(model, targets)).backward()
        opt.step()


def assert_params_close(a, b, rtol=PARAM_RTOL):
    for i, (pa, pb) in enumerate(zip(a.parameters(), b.parameters())):
        scale = pb.detach().abs().max().item()
        torch.testing.assert_close(pa.detach(), pb.detach(), rtol=rtol, atol=rtol * scale,
                                   msg=lambda m: f"param {i}: {m}")


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
@pytest.mark.parametrize("options", [
    dict(),
    dict(nesterov=False, weight_decay=0.0),
    dict(adjust_lr_fn="match_rms_adamw", momentum=0.3),
    dict(adjust_lr_fn="spectral_unclamped", ns_steps=3),
], ids=["default", "plain", "match_rms_adamw", "spectral_unclamped"])
def test_same_numbers_as_torch_muon(backend_device, options):
    backend, device = backend_device
    ours, theirs = matrices_model().to(device), matrices_model().to(device)
    run_matrices(ours, Muon(ours.parameters(), lr=0.02, backend=backend, **options))
    run_matrices(theirs, torch.optim.Muon(theirs.parameters(), lr=0.02, **options))
    assert_params_close(ours, theirs)


def test_newton_schulz_is_torchs():
    """On the CPU a large matrix (or one alone of its shape) takes torch's chain: bit for bit
    torch's. Small ones of one shape, like a GPU's, take the batched chain: torch's numbers
    within a bfloat16 ulp, a tall one transposed."""
    from torch.optim._muon import _zeropower_via_newtonschulz
    g = torch.Generator().manual_seed(0)
    coefficients = (3.4445, -4.775, 2.0315)
    large = [torch.randn(s, generator=g) for s in [(130, 129), (130, 129), (140, 120), (1, 5)]]
    assert 130 * 129 > SMALL
    for m, o in zip(large, orthogonalize(large, coefficients, 5, 1e-7)):
        assert torch.equal(o, _zeropower_via_newtonschulz(m, coefficients, 5, 1e-7))
    small = [torch.randn(s, generator=g) for s in [(16, 16), (16, 16), (24, 8), (24, 8), (8, 24), (8, 24)]]
    for m, o in zip(small, orthogonalize(small, coefficients, 5, 1e-7)):
        want = _zeropower_via_newtonschulz(m, coefficients, 5, 1e-7)
        assert o.dtype == torch.bfloat16 and o.shape == m.shape
        torch.testing.assert_close(o.float(), want.float(), rtol=2 ** -7, atol=2 ** -7 * want.abs().max().item())


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.LayerNorm(32),
                         nn.Linear(32, 3))


def train_mlp(model, opt, steps=STEPS):
    x, y = make_data("cpu")
    for _ in range(steps):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def test_param_groups_split_a_model():
    """Hidden matrices to Muon; biases, norm scales, embeddings and heads to AdamW; tied
    params once; flatten takes conv weights as matrices."""
    model = nn.ModuleDict(dict(embed=nn.Embedding(10, 8), body=nn.Linear(8, 8), norm=nn.LayerNorm(8),
                               conv=nn.Conv2d(2, 3, 3), lm_head=nn.Linear(8, 10, bias=False)))
    model.lm_head.weight = model.embed.weight  # tied
    muon, adamw = muon_param_groups(model)
    assert muon["use_muon"] and not adamw["use_muon"]
    assert [p.shape for p in muon["params"]] == [model.body.weight.shape]
    assert len(muon["params"]) + len(adamw["params"]) == len(list(model.parameters()))
    assert any(p is model.embed.weight for p in adamw["params"])
    muon, _ = muon_param_groups(model, flatten=True)
    assert any(p is model.conv.weight for p in muon["params"]) and muon["flatten"]
    assert muon_param_groups(nn.Linear(3, 3, bias=False))[0]["use_muon"]  # no empty AdamW group


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_whole_model_muon_and_adamw_groups(backend_device):
    """The Muon groups are torch's Muon, the AdamW groups catapult's AdamW with Muon's AdamW
    defaults (betas (0.9, 0.95), eps 1e-8), in one optimizer: a step of both at once."""
    backend, _ = backend_device
    ours, muon_only = mlp(), mlp()
    opt = Muon(muon_param_groups(ours), lr=0.02, weight_decay=0.01, backend=backend)
    adamw_group = opt.param_groups[1]
    assert adamw_group["betas"] == (0.9, 0.95) and adamw_group["eps"] == 1e-8
    train_mlp(ours, opt)
    muon_groups = muon_param_groups(muon_only)
    torch_muon = torch.optim.Muon(muon_groups[0]["params"], lr=0.02, weight_decay=0.01)
    torch_adamw = torch.optim.AdamW(muon_groups[1]["params"], lr=0.02, weight_decay=0.01, betas=(0.9, 0.95), eps=1e-8)
    x, y = make_data("cpu")
    for _ in range(STEPS):
        for o in (torch_muon, torch_adamw):
            o.zero_grad()
        ((muon_only(x) - y) ** 2).mean().backward()
        torch_muon.step()
        torch_adamw.step()
    assert_params_close(ours, muon_only)


def test_adamw_group_equals_catapult_adamw_bit_for_bit():
    model, ref = mlp(), mlp()
    biases = lambda m: [p for p in m.parameters() if p.dim() == 1]  # noqa: E731
    opt = Muon([{"params": biases(model), "use_muon": False}], lr=0.01, weight_decay=0.05)
    ref_opt = AdamW(biases(ref), lr=0.01, weight_decay=0.05, betas=(0.9, 0.95), eps=1e-8)
    train_mlp(model, opt)
    train_mlp(ref, ref_opt)
    for a, b in zip(biases(model), biases(ref)):
        assert torch.equal(a, b)


def test_clip_over_every_group_is_torchs_clip_grad_norm():
    """max_grad_norm clips by the norm over the Muon and the AdamW groups together: one step
    equals clip_grad_norm_ then torch's Muon and AdamW. (Over many steps the two drift apart:
    our AdamW and torch's differ in the last bit, and Newton-Schulz's bfloat16 rounding
    amplifies any difference in its input to a bfloat16 ulp of the update.)"""
    ours, theirs = mlp(), mlp()
    opt = Muon(muon_param_groups(ours), lr=0.02, max_grad_norm=0.05)
    groups = muon_param_groups(theirs)
    torch_muon = torch.optim.Muon(groups[0]["params"], lr=0.02)
    torch_adamw = torch.optim.AdamW(groups[1]["params"], lr=0.02, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    x, y = make_data("cpu")
    ((ours(x) - y) ** 2).mean().backward()
    opt.step()
    ((theirs(x) - y) ** 2).mean().backward()
    norm = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 0.05)
    torch_muon.step()
    torch_adamw.step()
    assert norm > 0.05  # the clip acts
    torch.testing.assert_close(opt.grad_norm, norm, rtol=1e-6, atol=0)
    assert_params_close(ours, theirs, rtol=1e-6)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES)
def test_skipped_step_changes_nothing(backend_device):
    backend, _ = backend_device
    model = mlp()
    opt = Muon(muon_param_groups(model), lr=0.02, skip_nonfinite=True, grokfast=dict(alpha=0.9, lamb=1.0),
               backend=backend)
    train_mlp(model, opt, steps=2)
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    x, y = make_data("cpu")
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    model[2].weight.grad[0, 0] = float("nan")
    opt.step()
    after = (model.state_dict(), opt.state_dict())
    for key, t in before[0].items():
        assert torch.equal(t, after[0][key]), key
    for idx, state in before[1]["state"].items():
        for key, t in state.items():
            assert torch.equal(t, after[1]["state"][idx][key]), (idx, key)
    assert opt.skipped_steps.item() == 1


@pytest.mark.parametrize("shape", [(4, 2, 3, 3), (3, 4, 5)], ids=["conv", "stacked"])
def test_flatten_is_the_matrix_step(shape):
    """flatten=True steps an N-D weight as its (dim 0, the rest) matrix: a conv weight
    (out, in, kh, kw) as (out, in * kh * kw); a stack (E, out, in) as ONE (E, out * in) matrix
    (not E matrices: stacked experts want a param each)."""
    torch.manual_seed(0)
    conv = nn.Parameter(torch.randn(*shape))
    matrix = nn.Parameter(conv.detach().reshape(shape[0], -1).clone())
    opt_conv = Muon([{"params": [conv], "flatten": True}], lr=0.02)
    opt_matrix = Muon([matrix], lr=0.02)
    for _ in range(3):
        conv.grad = torch.sin(conv.detach() * 3)
        matrix.grad = torch.sin(matrix.detach() * 3)
        opt_conv.step()
        opt_matrix.step()
    assert torch.equal(conv.detach().reshape(shape[0], -1), matrix.detach())


def test_bad_input_is_refused_before_anything_changes():
    with pytest.raises(ValueError, match=r"2D parameters .*\(3,\)"):
        Muon([nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="Adjust learning rate function"):
        Muon([nn.Parameter(torch.zeros(3, 3))], adjust_lr_fn="bogus")
    with pytest.raises(ValueError, match="use_muon"):
        Muon([{"params": [nn.Parameter(torch.zeros(3, 3))], "use_muon": "yes"}])
    with pytest.raises(ValueError, match="momentum"):
        Muon([nn.Parameter(torch.zeros(3, 3))], momentum=1.5)
    with pytest.raises(ValueError, match="ns_group"):
        Muon([nn.Parameter(torch.zeros(3, 3))], ns_group="world")


def test_state_dict_moves_between_torch_muon_and_ours():
    """The momentum buffers (state key `momentum_buffer`) move both ways: 10 + 10 steps across
    a move equal 20 uninterrupted ones."""
    for first, second in ((torch.optim.Muon, Muon), (Muon, torch.optim.Muon)):
        model, straight = matrices_model(), matrices_model()
        opt = first(model.parameters(), lr=0.02)
        run_matrices(model, opt, steps=10)
        opt2 = second(model.parameters(), lr=0.02)
        opt2.load_state_dict(opt.state_dict())
        run_matrices(model, opt2, steps=10, seed=1)
        run_matrices(straight, torch.optim.Muon(straight.parameters(), lr=0.02), steps=20)
        assert_params_close(model, straight)
