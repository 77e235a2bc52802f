"""The trainer's transformer: our own pre-LayerNorm decoder (--transformer pre-ln, the default)
and the Grokfast paper's take on Power et al.'s (--transformer power): its sequence format,
residual wiring, init, causal mask and output size."""
import json
import math

import pytest
import torch
from torch import nn

from catapult_kernels.train.cli import main
from catapult_kernels.train.config import TrainConfig
from catapult_kernels.train.models import Block, Transformer, make_model
from catapult_kernels.train.tasks import make_task, modular


def _gen():
    return torch.Generator().manual_seed(0)


def test_power_sequence_is_a_op_b_eq_and_mul_skips_b_zero():
    p = 11
    data = modular(p, "mul", 0.5, _gen(), tokens=True, power=True)
    x = torch.cat([data.x_train, data.x_val])
    y = torch.cat([data.y_train, data.y_val])
    assert x.shape == (p * (p - 1), 4) and len(data.y_train) == 55  # 0 <= a < p, 0 < b < p, half for training
    assert (x[:, 1] == p + 1).all() and (x[:, 3] == p).all()  # 'op' is p + 1, '=' is p
    assert (x[:, 2] != 0).all() and len({tuple(r.tolist()) for r in x}) == len(x)
    assert (y == x[:, 0] * x[:, 2] % p).all()
    assert (data.in_dim, data.out_dim, data.n_classes) == (p + 2, p + 2, p)  # the head scores every token


def test_power_sequence_keeps_every_pair_of_add():
    data = modular(5, "add", 0.5, _gen(), tokens=True, power=True)
    x = torch.cat([data.x_train, data.x_val])
    assert len(x) == 25 and (torch.cat([data.y_train, data.y_val]) == (x[:, 0] + x[:, 2]) % 5).all()


def test_the_config_picks_the_sequence_format():
    pre_ln = make_task(TrainConfig(model="transformer", op="mul", p=7))
    power = make_task(TrainConfig(model="transformer", transformer="power", op="mul", p=7))
    assert pre_ln.x_train.shape[1] == 3 and (pre_ln.in_dim, pre_ln.out_dim) == (8, 7)  # [a, b, =], as before
    assert power.x_train.shape[1] == 4 and (power.in_dim, power.out_dim) == (9, 9)


def _multihead_reference(block: Block, x: torch.Tensor) -> torch.Tensor:
    """The Grokfast paper's block written with torch's nn.MultiheadAttention and an additive
    causal mask: x = ln1(x); x = x + attn(x); x + mlp(ln2(x))."""
    d, t = x.shape[-1], x.shape[1]
    mha = nn.MultiheadAttention(d, block.heads, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(block.qkv.weight)
        mha.in_proj_bias.copy_(block.qkv.bias)
        mha.out_proj.weight.copy_(block.proj.weight)
        mha.out_proj.bias.copy_(block.proj.bias)
    mask = torch.full((t, t), float("-inf")).triu(1)
    h = block.ln1(x)
    h = h + mha(h, h, h, attn_mask=mask, need_weights=False)[0]
    return h + block.mlp(block.ln2(h))


def test_power_block_is_the_multihead_attention_block_with_the_normed_residual():
    torch.manual_seed(0)
    block = Block(16, 4, normed_residual=True)
    for p in block.parameters():  # LayerNorm and biases away from their init, so every term shows
        nn.init.normal_(p, std=0.5)
    x = torch.randn(3, 4, 16)
    torch.testing.assert_close(block(x), _multihead_reference(block, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("normed_residual", [False, True])
def test_residual_wiring(normed_residual):
    """With the attention's output zeroed, what remains is the residual stream: x (pre-ln) or
    ln1(x) (power), then the MLP's residual."""
    torch.manual_seed(0)
    block = Block(8, 2, normed_residual=normed_residual)
    nn.init.normal_(block.ln1.weight)  # ln1(x) is not x's normalization alone
    with torch.no_grad():
        block.proj.weight.zero_()
        block.proj.bias.zero_()
    x = torch.randn(2, 3, 8) * 3 + 1
    stream = block.ln1(x) if normed_residual else x
    torch.testing.assert_close(block(x), stream + block.mlp(block.ln2(stream)))


@pytest.mark.parametrize("normed_residual", [False, True])
def test_block_is_causal(normed_residual):
    """A token changes the block's output at its own position and after, never before."""
    torch.manual_seed(0)
    block = Block(8, 2, normed_residual=normed_residual)
    x = torch.randn(1, 4, 8)
    for j in range(4):
        moved = x.clone()
        moved[0, j] += torch.randn(8)  # not a constant shift, which LayerNorm would remove
        changed = (block(moved) - block(x)).abs().amax(-1)[0] > 1e-6
        assert changed.tolist() == [i >= j for i in range(4)]


def test_power_transformer_reads_every_token_and_scores_the_vocabulary():
    cfg = TrainConfig(model="transformer", transformer="power", op="mul", p=11, layers=2, d_model=16, heads=2)
    data = make_task(cfg)
    model = make_model(cfg, data.in_dim, data.out_dim)
    x = data.x_train[:5]
    assert model(x).shape == (5, 13) and model.pos.shape == (4, 16)
    for j in (0, 2):  # a and b both reach the prediction at '='
        moved = x.clone()
        moved[:, j] = (moved[:, j] + 1) % 11
        assert not torch.allclose(model(moved), model(x))


def test_power_init_is_multihead_attentions():
    d = 64
    model = Transformer(vocab=13, n_classes=13, layers=2, d_model=d, heads=4, context=4, style="power")
    assert 0.9 < model.pos.std().item() < 1.1  # nn.Embedding's N(0, 1), as the token embeddings
    for block in model.blocks:
        assert block.normed_residual
        assert (block.qkv.bias == 0).all() and (block.proj.bias == 0).all()
        xavier = math.sqrt(6 / (d + 3 * d))  # over the stacked (3 d, d) matrix
        assert 1 / math.sqrt(d) < block.qkv.weight.abs().max().item() <= xavier  # not nn.Linear's bound
    ours = Transformer(vocab=12, n_classes=11, layers=1, d_model=d, heads=4)
    assert not ours.blocks[0].normed_residual and ours.pos.std().item() < 0.05
    assert (ours.blocks[0].qkv.bias != 0).all()


@pytest.mark.parametrize("args, message", [
    (["--transformer", "gpt2"], "unknown transformer 'gpt2'; choose one of: pre-ln, power"),
    (["--transformer", "power"], "--transformer power applies to --model transformer, not mlp"),
])
def test_bad_transformer_option_is_one_clear_line(args, message, capsys, tmp_path):
    assert main(args + ["--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_power_run_end_to_end(tmp_path):
    """A short run: lambda0 needs the model differentiable twice; config.json records the style."""
    out = tmp_path / "r"
    assert main(["--task", "modular", "--op", "mul", "--p", "11", "--model", "transformer", "--transformer", "power",
                 "--layers", "1", "--d-model", "16", "--heads", "2", "--batch-size", "16", "--optimizer", "adam",
                 "--weight-decay", "0.005", "--grokfast", "ema", "--warmup", "2", "--steps", "6", "--log-every", "3",
                 "--sharpness-iters", "3", "--quiet", "--no-plots", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["lambda0"] > 0 and summary["final_val_acc"] is not None
    assert json.loads((out / "config.json").read_text())["transformer"] == "power"
