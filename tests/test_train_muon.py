"""catapult-train --optimizer muon: the hidden matrices go to Muon, every other param to its
AdamW groups; it trains the built-in models, records its options in config.json, resumes bit
for bit, and refuses bad options in one line."""
import json

import pytest
import torch

from catapult_kernels.optim import Muon
from catapult_kernels.train import TrainConfig
from catapult_kernels.train.cli import main
from catapult_kernels.train.models import MLP, Transformer
from catapult_kernels.train.optimizers import make_optimizer

MODULAR = ["--task", "modular", "--p", "13", "--loss", "ce", "--optimizer", "muon", "--lr", "0.02",
           "--log-every", "2", "--sharpness-iters", "5", "--quiet", "--no-plots"]
MODELS = {"mlp": ["--model", "mlp", "--depth", "3", "--width", "32"],
          "transformer": ["--model", "transformer", "--d-model", "16", "--heads", "2"]}


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def shapes(group: dict) -> list[tuple]:
    return [tuple(p.shape) for p in group["params"]]


@pytest.mark.parametrize("model", MODELS)
def test_muon_trains_the_builtin_models(tmp_path, model):
    out = tmp_path / "r"
    assert main(MODULAR + MODELS[model] + ["--steps", "10", "--out", str(out)]) == 0
    losses = [r["loss"] for r in read_jsonl(out / "metrics.jsonl")]
    assert losses[-1] < 0.9 * losses[0]


def test_mlp_groups_hidden_matrices_to_muon_the_rest_to_adamw():
    model = MLP(10, 5, depth=4, width=64, bias=True)
    groups = model.param_groups("muon")
    muon = [g for g in groups if g["use_muon"]]
    adamw = [g for g in groups if not g["use_muon"]]
    assert [shapes(g) for g in muon] == [[(64, 64), (64, 64)]]
    assert sorted(s for g in adamw for s in shapes(g)) == sorted([(64, 10), (5, 64), (64,), (64,), (64,), (5,)])
    assert all(g["lr_mult"] == 1.0 for g in groups)  # standard parametrization


@pytest.mark.parametrize("adjust_lr, hidden_mult", [(None, 1.0), ("original", 1.0), ("spectral_unclamped", 1.0),
                                                    ("match_rms_adamw", 0.5)])
def test_mup_multipliers_under_muon(adjust_lr, hidden_mult):
    """muP at width 4x the base: the AdamW groups take Adam's multipliers (input and biases 1,
    output 1/4); the hidden matrices whatever undoes the width dependence of Muon's lr ratio."""
    model = MLP(10, 5, depth=3, width=512, parametrization="mup", base_width=128)
    mults = {(tuple(p.shape), g["use_muon"]): g["lr_mult"]
             for g in model.param_groups("muon", adjust_lr) for p in g["params"]}
    assert mults == {((512, 10), False): 1.0, ((512,), False): 1.0, ((5,), False): 1.0,
                     ((512, 512), True): hidden_mult, ((5, 512), False): 0.25}


def test_transformer_groups_block_matrices_to_muon_and_embeddings_positions_head_to_adamw():
    model = Transformer(vocab=14, n_classes=13, layers=2, d_model=16, heads=2)
    muon, adamw = model.param_groups("muon")
    assert muon["use_muon"] and not adamw["use_muon"]
    in_muon = {id(p) for p in muon["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in in_muon}
    assert names == {f"blocks.{i}.{w}.weight" for i in range(2) for w in ("qkv", "proj", "mlp.0", "mlp.2")}
    assert len(muon["params"]) + len(adamw["params"]) == len(list(model.parameters()))


def test_make_optimizer_passes_the_options_to_each_kind_of_group():
    cfg = TrainConfig(optimizer="muon", depth=3, width=16, momentum=0.9, nesterov=False, adjust_lr="match_rms_adamw",
                      beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.05)
    opt = make_optimizer(cfg, MLP(4, 3, depth=3, width=16), lr=0.03)
    assert isinstance(opt, Muon)
    for g in opt.param_groups:
        assert g["lr"] == 0.03 and g["weight_decay"] == 0.05
        if g["use_muon"]:
            assert (g["momentum"], g["nesterov"], g["adjust_lr_fn"], g["eps"]) == (0.9, False, "match_rms_adamw", 1e-7)
        else:
            assert (g["betas"], g["eps"]) == ((0.8, 0.99), 1e-6)


@pytest.mark.parametrize("given, recorded", [
    ([], dict(momentum=0.95, nesterov=True, adjust_lr="original", beta1=0.9, beta2=0.95, beta3=None, eps=1e-8,
              weight_decay=0.0)),
    (["--momentum", "0.9", "--no-nesterov", "--adjust-lr", "match_rms_adamw", "--beta2", "0.99", "--eps", "1e-6",
      "--weight-decay", "0.1"],
     dict(momentum=0.9, nesterov=False, adjust_lr="match_rms_adamw", beta1=0.9, beta2=0.99, beta3=None, eps=1e-6,
          weight_decay=0.1)),
])
def test_config_json_records_muon_options(tmp_path, given, recorded):
    out = tmp_path / "r"
    assert main(MODULAR + MODELS["mlp"] + ["--steps", "2"] + given + ["--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert {k: cfg[k] for k in recorded} == recorded


def test_other_optimizers_record_no_muon_options(tmp_path):
    out = tmp_path / "r"
    args = MODULAR + MODELS["mlp"] + ["--steps", "2", "--out", str(out)]
    args[args.index("muon")] = "sgd"
    assert main(args + ["--momentum", "0.5"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["momentum"], cfg["nesterov"], cfg["adjust_lr"]) == (0.5, False, None)


def test_resume_is_bit_for_bit(tmp_path):
    split, whole = tmp_path / "split", tmp_path / "whole"
    run = MODULAR + MODELS["mlp"] + ["--adjust-lr", "match_rms_adamw", "--weight-decay", "0.1",
                                     "--batch-size", "16", "--log-every", "1"]
    assert main(run + ["--steps", "3", "--out", str(split)]) == 0
    assert main(["--resume", "--out", str(split), "--steps", "6", "--quiet"]) == 0
    assert main(run + ["--steps", "6", "--out", str(whole)]) == 0
    drop = ("wall_s", "steps_per_s")
    records = [[{k: v for k, v in r.items() if k not in drop} for r in read_jsonl(d / "metrics.jsonl")]
               for d in (split, whole)]
    assert records[0] == records[1]
    ours, theirs = (torch.load(d / "checkpoint.pt", weights_only=False) for d in (split, whole))
    for k in theirs["model"]:
        assert torch.equal(ours["model"][k], theirs["model"][k]), k
    assert main(["--resume", "--out", str(split), "--steps", "8", "--adjust-lr", "original"]) == 2


@pytest.mark.parametrize("args, message", [
    (["--adjust-lr", "rms"], "unknown adjust_lr 'rms'; choose one of: original, match_rms_adamw, spectral_unclamped"),
    (["--optimizer", "adamw", "--adjust-lr", "original"], "--adjust-lr applies to muon, not adamw"),
    (["--momentum", "1.0"], "--momentum must lie in [0, 1) for muon, got 1.0"),
    (["--momentum", "0", "--nesterov"], "--nesterov needs --momentum > 0"),
    (["--impl", "torch"], "--impl torch has sgd, adam and adamw; muon exists only as catapult"),
])
def test_bad_muon_options_are_one_clear_line(tmp_path, capsys, args, message):
    assert main(MODULAR + MODELS["mlp"] + ["--steps", "2"] + args + ["--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()
