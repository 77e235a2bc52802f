"""The trainer's models: an MLP in standard, NTK or muP parametrization, and a small
decoder-only transformer for modular arithmetic.

Each model has `param_groups(optimizer, adjust_lr)`: the parameter groups with their lr
multipliers, which are 1 everywhere except under muP (Yang et al. 2022, TP-V Table 3, with a
base width at which muP equals the standard parametrization). For muon each group also says
use_muon: the hidden matrices go to Muon, everything else (input and output layers,
embeddings, biases, norms) to its AdamW groups, as Muon's authors advise."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..optim.muon import lr_ratio
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
        self.width, self.base_width, self.width_mult = width, base_width, width / base_width
        for i, layer in enumerate(self.layers):
            layer.role = "output" if i == depth - 1 else "input" if i == 0 else "hidden"
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = self.act(layer(x))
        return self.layers[-1](x)

    def param_groups(self, optimizer: str, adjust_lr: Optional[str] = None) -> list[dict]:
        """One group per lr multiplier (and for muon per kind: the hidden weights use_muon, the
        input and output weights and the biases AdamW), in the order of the params."""
        muon = optimizer == "muon"
        groups: dict[tuple, list] = {}
        for layer in self.layers:
            for p, kind in ((layer.weight, layer.role), (layer.bias, "bias")):
                if p is not None:
                    on_muon = muon and kind == "hidden"
                    mult = self._muon_lr_mult(adjust_lr) if on_muon else self._lr_mult(kind, optimizer)
                    groups.setdefault((mult, on_muon), []).append(p)
        return [{"params": ps, "lr_mult": mult, **({"use_muon": on_muon} if muon else {})}
                for (mult, on_muon), ps in groups.items()]

    def _lr_mult(self, kind: str, optimizer: str) -> float:
        if self.parametrization != "mup":
            return 1.0
        m = self.width_mult
        # TP-V Table 3: (SGD lr, Adam lr) multipliers per kind of parameter; Muon's AdamW groups take Adam's
        rule = {"input": (m, 1.0), "hidden": (1.0, 1.0 / m), "output": (1.0 / m, 1.0 / m), "bias": (m, 1.0)}
        return rule[kind][0 if optimizer in SGD_LIKE else 1]

    def _muon_lr_mult(self, adjust_lr: Optional[str]) -> float:
        """A hidden (width x width) matrix's multiplier under Muon and muP: whatever undoes the
        width dependence of Muon's own lr ratio, so that its step's spectral norm is the same at
        every width as at the base width (muP's spectral condition, Yang, Simon and Bernstein
        2023): 1 for original and spectral_unclamped (ratio 1 for a square matrix: Newton-Schulz
        already makes the step width-free), 1/sqrt(width_mult) for match_rms_adamw (ratio
        0.2 sqrt(width))."""
        if self.parametrization != "mup":
            return 1.0
        base, width = (self.base_width,) * 2, (self.width,) * 2
        return lr_ratio(base, adjust_lr) / lr_ratio(width, adjust_lr)


class Block(nn.Module):
    """Causal self-attention and a GELU MLP, each behind a LayerNorm. `normed_residual`: the
    attention's residual starts from ln1(x), not x (x = ln1(x); x = x + attn(x)), as in the
    Grokfast authors' decoder; else the usual pre-LayerNorm x + attn(ln1(x))."""

    def __init__(self, d_model: int, heads: int, normed_residual: bool = False):
        super().__init__()
        self.heads, self.normed_residual = heads, normed_residual
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = self.ln1(x)
        q, k, v = self.qkv(h).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # plain causal attention: differentiable twice, for the sharpness's Hessian-vector products
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        x = (h if self.normed_residual else x) + self.proj(att.transpose(1, 2).reshape(n, t, d))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Decoder-only; predicts c from the last position (Power et al. 2022 use 2 layers,
    d_model 128, 4 heads). style "pre-ln": our own pre-LayerNorm decoder, reading [a, b, =].
    style "power": the decoder of the Grokfast paper's code (Lee et al. 2024), its take on
    Power et al.'s, reading [a, op, b, =]: the attention's residual from ln1(x) (Block's
    normed_residual); nn.MultiheadAttention's init (qkv Xavier-uniform, attention biases 0);
    positions N(0, 1) as nn.Embedding's. The caller gives n_classes: the whole vocabulary
    there, as the Grokfast code's head scores every token."""

    def __init__(self, vocab: int, n_classes: int, layers: int, d_model: int, heads: int, context: int = 3,
                 style: str = "pre-ln"):
        super().__init__()
        power = style == "power"
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(context, d_model) * (1.0 if power else 0.02))
        self.blocks = nn.ModuleList(Block(d_model, heads, normed_residual=power) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.unembed = nn.Linear(d_model, n_classes, bias=False)
        if power:
            for block in self.blocks:
                nn.init.xavier_uniform_(block.qkv.weight)  # over the stacked (3 d, d) matrix, as torch's in_proj
                nn.init.zeros_(block.qkv.bias)
                nn.init.zeros_(block.proj.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln(x[:, -1]))

    def param_groups(self, optimizer: str, adjust_lr: Optional[str] = None) -> list[dict]:
        if optimizer != "muon":
            return [{"params": list(self.parameters()), "lr_mult": 1.0}]
        matrices = [p for p in self.blocks.parameters() if p.dim() == 2]  # attention and MLP weights
        muon = {id(p) for p in matrices}
        rest = [p for p in self.parameters() if id(p) not in muon]  # embeddings, positions, norms, biases, unembed
        return [{"params": matrices, "lr_mult": 1.0, "use_muon": True},
                {"params": rest, "lr_mult": 1.0, "use_muon": False}]


def make_model(cfg: TrainConfig, in_dim: int, out_dim: int) -> nn.Module:
    """Built on the CPU from the seed, so the same seed gives the same weights on any device."""
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG state is left as it was
        torch.manual_seed(cfg.seed)
        if cfg.model == "transformer":
            context = 4 if cfg.transformer == "power" else 3  # [a, op, b, =] or [a, b, =]
            return Transformer(in_dim, out_dim, cfg.layers, cfg.d_model, cfg.heads, context, cfg.transformer)
        return MLP(in_dim, out_dim, cfg.depth, cfg.width, cfg.activation, cfg.parametrization, cfg.bias,
                   cfg.base_width, cfg.ntk_bias_scale)
