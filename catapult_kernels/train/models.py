"""The trainer's models: an MLP in standard, NTK or muP parametrization, and a small
decoder-only transformer for modular arithmetic.

Each model has `param_groups(optimizer)`: the parameter groups with their lr multipliers,
which are 1 everywhere except under muP (Yang et al. 2022, TP-V Table 3, with a base width
at which muP equals the standard parametrization)."""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig

SGD_LIKE = ("sgd", "lars")  # the others normalize updates per coordinate: muP's Adam rules


class Dense(nn.Module):
    """y = multiplier * x W^T + bias_multiplier * b. The multipliers are the NTK
    parametrization's 1/sqrt(fan_in) and beta; `lr_mult` is the layer's learning-rate
    multiplier (muP)."""

    def __init__(self, fan_in: int, fan_out: int, bias: bool, multiplier: float = 1.0,
                 bias_multiplier: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(fan_out, fan_in))
        self.bias = nn.Parameter(torch.zeros(fan_out)) if bias else None
        self.multiplier, self.bias_multiplier = multiplier, bias_multiplier
        self.lr_mult = {"weight": 1.0, "bias": 1.0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight.t()
        if self.multiplier != 1.0:
            y = y * self.multiplier
        if self.bias is None:
            return y
        return y + (self.bias if self.bias_multiplier == 1.0 else self.bias * self.bias_multiplier)


ACTIVATIONS = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "quadratic": torch.square,
    "linear": lambda x: x,
}


class MLP(nn.Module):
    """`depth` weight layers (depth 2: one hidden layer of `width` units). `ntk_bias_scale`:
    the NTK parametrization's bias multiplier beta."""

    def __init__(self, in_dim: int, out_dim: int, depth: int, width: int, activation: str = "relu",
                 parametrization: str = "standard", bias: bool = True, base_width: int = 128,
                 ntk_bias_scale: float = 0.1):
        super().__init__()
        dims = [in_dim] + [width] * (depth - 1) + [out_dim]
        self.layers = nn.ModuleList(Dense(a, b, bias) for a, b in zip(dims[:-1], dims[1:]))
        self.act = ACTIVATIONS[activation]
        self.parametrization = parametrization
        self.ntk_bias_scale = ntk_bias_scale
        self.width_mult = width / base_width
        for i, layer in enumerate(self.layers):
            self._init(layer, is_input=i == 0, is_output=i == depth - 1)

    def _init(self, layer: Dense, is_input: bool, is_output: bool) -> None:
        fan_in = layer.weight.shape[1]
        if self.parametrization == "standard":  # nn.Linear's default
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(layer.weight, -bound, bound)
            if layer.bias is not None:
                nn.init.uniform_(layer.bias, -bound, bound)
        elif self.parametrization == "ntk":
            nn.init.normal_(layer.weight)
            layer.multiplier = 1.0 / math.sqrt(fan_in)
            if layer.bias is not None:
                # Jacot et al.: b ~ N(0, 1) used as beta * b. The output bias adds beta^2 to the
                # curvature, in a direction the weights cannot flatten: at beta = 1 it dominates
                # lambda0 and lr = 3/lambda0 diverges instead of catapulting.
                nn.init.normal_(layer.bias)
                layer.bias_multiplier = self.ntk_bias_scale
        else:  # muP: output weights get variance 1/(fan_in * m), the rest 1/fan_in; biases start at 0
            m = self.width_mult
            nn.init.normal_(layer.weight, std=1.0 / math.sqrt(fan_in * (m if is_output else 1.0)))
            layer.role = "output" if is_output else "input" if is_input else "hidden"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return self.layers[-1](x)

    def param_groups(self, optimizer: str) -> list[dict]:
        if self.parametrization != "mup":
            return [{"params": list(self.parameters()), "lr_mult": 1.0}]
        m, adam = self.width_mult, optimizer not in SGD_LIKE
        # TP-V Table 3: (SGD lr, Adam lr) multipliers per kind of parameter
        rule = {"input": (m, 1.0), "hidden": (1.0, 1.0 / m), "output": (1.0 / m, 1.0 / m), "bias": (m, 1.0)}
        groups: dict[float, list] = {}
        for layer in self.layers:
            kinds = [("weight", layer.role), ("bias", "bias")]
            for name, kind in kinds:
                p = getattr(layer, name)
                if p is not None:
                    groups.setdefault(rule[kind][1 if adam else 0], []).append(p)
        return [{"params": ps, "lr_mult": mult} for mult, ps in groups.items()]


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # plain causal attention: differentiable twice, for the sharpness's Hessian-vector products
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = x + self.proj(att.transpose(1, 2).reshape(n, t, d))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Decoder-only, pre-LayerNorm; reads [a, b, =] and predicts c from the last position
    (Power et al. 2022 use 2 layers, d_model 128, 4 heads)."""

    def __init__(self, vocab: int, n_classes: int, layers: int, d_model: int, heads: int, context: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(context, d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(d_model, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.unembed = nn.Linear(d_model, n_classes, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln(x[:, -1]))

    def param_groups(self, optimizer: str) -> list[dict]:
        return [{"params": list(self.parameters()), "lr_mult": 1.0}]


def make_model(cfg: TrainConfig, in_dim: int, out_dim: int) -> nn.Module:
    """Built on the CPU from the seed, so the same seed gives the same weights on any device."""
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG state is left as it was
        torch.manual_seed(cfg.seed)
        if cfg.model == "transformer":
            return Transformer(in_dim, out_dim, cfg.layers, cfg.d_model, cfg.heads)
        return MLP(in_dim, out_dim, cfg.depth, cfg.width, cfg.activation, cfg.parametrization, cfg.bias,
                   cfg.base_width, cfg.ntk_bias_scale)
