"""The Triton kernels compile for a GPU without one. The interpreter, which runs them in
this suite on CPU, accepts code that the compiler refuses (and never sees the
compiler's FMA contraction), so a subprocess without TRITON_INTERPRET records every
launch the ops make (each update op once per dtype, with the whole grad pipeline on,
also with its states and Grokfast emas stored otherwise: int8 blocks, bfloat16 beside
float32 params; AdamW's and LAMB's also with master weights of bfloat16 params) instead
of running it, and compiles each for sm_90 (the GPU machine's H100/H200) with
triton.compile. Every update kernel keeps its numerics there: no a*b+c fused into an
FMA (enable_fp_fusion=False: every operation rounds once, as on the CPU; the ops in
EXPLICIT_FMA fuse theirs on purpose, on every backend), float32 loads stay vectorized
(16 bytes), and int8 codes round half to even (cvt.rni, libdevice's rint)."""
import importlib.util
import math
import os
import re
import subprocess
import sys

import pytest

# The update ops whose math fuses a * b + c on purpose (kernel_common.fma, as torch's lerp
# and add with alpha do): their PTX has fma.rn.f32 by design.
EXPLICIT_FMA = ("muon_momentum", "muon_update")


# ~45 s on 2 cores with an empty Triton cache (~90 kernel variants compiled, LAMB's with storage and master
# weights ~8 s of it; cached after: ~5-10 s).
# Not conftest's triton check: importing conftest switches the interpreter on, here and in the subprocess.
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs the triton package")
def test_every_launch_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    compiled = re.findall(r"^compiled (\S+)", done.stdout, re.M)
    names = {"_update_kernel", "_advance_steps_kernel", "_lamb_kernel", "_lamb_trust_kernel"}
    assert names <= set(compiled), done.stdout
    for line in ("_update_kernel int8", "_lamb_kernel int8", "_update_kernel master", "_lamb_kernel master",
                 "_lamb_kernel int8 master", "_advance_steps_kernel master"):
        assert re.search(f"^compiled {line}$", done.stdout, re.M), f"{line}: {done.stdout}"


def _record_launches() -> list:
    """(kernel, arguments) of every launch of every update op (CPU tensors, nothing run)."""
    import torch

    import catapult_kernels.triton as triton_ops
    from catapult_kernels.ops import UPDATE_OPS, PipelineArgs
    from catapult_kernels.triton import kernel_common, lamb

    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    kernel_common.wrap_triton = lamb.wrap_triton = Recorder
    kernel_common.check_runnable = lambda device, kernel: None  # CPU tensors: only their addresses are read
    shapes = [(3, 70), (1030,)]
    hyper = {
        "adamw_": [dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True,
                        amsgrad=False),
                   dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled_weight_decay=False,
                        amsgrad=True)],
        "sgd_": [dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, first_step=False,
                      trust_ratios=None),
                 dict(momentum=0.9, dampening=0.1, weight_decay=0.1, nesterov=True, first_step=True,
                      trust_ratios=torch.ones(len(shapes)))],
        "lion_": [dict(beta1=0.9, beta2=0.99, weight_decay=0.1)],
        "adopt_": [dict(beta1=0.9, beta2=0.9999, eps=1e-6, weight_decay=0.1)],
        "adan_": [dict(beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-8, weight_decay=0.02, no_prox=no_prox)
                  for no_prox in (False, True)],
        "grad_pipeline_": [dict()],
        "muon_momentum_": [dict(momentum=0.95, nesterov=nesterov) for nesterov in (False, True)],
        "muon_update_": [dict(weight_decay=0.1, lr_ratios=torch.ones(len(shapes)))],
        "lamb_": [dict(beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, bias_correction=True,
                       max_weight_norm=1.0)],
    }
    assert set(hyper) == set(UPDATE_OPS), f"give {sorted(set(UPDATE_OPS) - set(hyper))} their arguments here"

    def record(op, h, dtype, storage, master=None):
        """Launches of one call of op over params of dtype, states and emas stored as
        storage (None: dtype), with master weights of that dtype (None: none)."""
        spec = UPDATE_OPS[op]

        def lists(dt=dtype):
            return [torch.zeros(s, dtype=dt) for s in shapes]
        unused = {("adamw_", "max_exp_avg_sqs"): not h.get("amsgrad"), ("sgd_", "momentum_buffers"):
                  h.get("momentum") == 0.0}
        states = [[] if unused.get((op, name)) else lists(storage or dtype) for name in spec.states]
        steps = [[torch.zeros(1) for _ in shapes]] if spec.has_step else []
        pipeline = PipelineArgs(grad_norm=torch.ones(1), max_grad_norm=1.0, grad_scale=torch.ones(1),
                                skip=torch.zeros(1), agc_scales=[torch.ones(3), torch.ones(1)],
                                grokfast_emas=lists(storage or dtype), maximize=True)
        stored = sum(1 for s in states if s) + 1  # the used states and the emas
        scales = [torch.zeros(-(-math.prod(s) // 128)) for _ in range(stored) for s in shapes]
        masters = [] if master is None else (
            [torch.zeros((), dtype=master) for _ in shapes] if master == torch.int64 else lists(master))
        state_scales = [scales if storage == torch.int8 else [], masters] if spec.stored else []
        triton_ops.KERNELS[op](lists(), lists(), *states, *steps, torch.ones(1),
                               *(h[name] for name in spec.hyper), *pipeline.args(), *state_scales)

    # (params' dtype, the states' and emas'); None: the params'. Other storage only where an op
    # takes it (state_scales).
    storages = [(torch.float32, None), (torch.bfloat16, None), (torch.float32, torch.int8),
                (torch.bfloat16, torch.int8), (torch.float32, torch.bfloat16)]
    for dtype, storage in storages:
        for op, cases in hyper.items():
            if storage is None or UPDATE_OPS[op].stored:
                for h in cases:
                    record(op, h, dtype, storage)
    # master weights of bfloat16 params: ecc corrections and stochastic rounding counters in
    # AdamW's (the elementwise kernel) and LAMB's beside int8 states, and LAMB's float32 copies
    # beside bfloat16 states (a float32 copy is a float32 state to the compiler)
    for master in (torch.int8, torch.int64):
        record("adamw_", hyper["adamw_"][0], torch.bfloat16, None, master)
        record("lamb_", hyper["lamb_"][0], torch.bfloat16, torch.int8, master)
    record("lamb_", hyper["lamb_"][0], torch.bfloat16, None, torch.float32)
    return launches


def _compile_all(launches) -> None:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    pointer = {torch.float32: "*fp32", torch.float64: "*fp64", torch.bfloat16: "*bf16", torch.float16: "*fp16",
               torch.int64: "*i64", torch.int8: "*i8"}
    seen = set()
    for kernel, args, kwargs in launches:
        values = dict(zip(kernel.arg_names, args), **kwargs)
        options = dict(num_warps=values.pop("num_warps", 4), enable_fp_fusion=values.pop("enable_fp_fusion", True))
        signature, constexprs = {}, {}
        for param in kernel.params:
            value = values[param.name]
            if param.is_constexpr:
                signature[param.name] = "constexpr"
                constexprs[param.name] = value
            elif isinstance(value, torch.Tensor):
                signature[param.name] = pointer[value.dtype]
            else:
                signature[param.name] = {bool: "i1", int: "i64", float: "fp32"}[type(value)]
        key = (kernel.fn.__name__, repr(sorted(constexprs.items(), key=lambda kv: kv[0])), repr(options))
        if key in seen:
            continue
        seen.add(key)
        ptx = triton.compile(triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                             target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
        what = f"{kernel.fn.__name__} {constexprs.get('CONSTANTS', '')} {constexprs.get('DTYPE', '')}"
        if any(name in what for name in EXPLICIT_FMA):  # their FMAs are written, not contracted
            assert not options["enable_fp_fusion"], f"{what}: compiled with FMA contraction"
        else:
            assert not re.search(r"\bfma\.rn\.f32\b", ptx), f"{what}: an FMA was contracted"
        if constexprs.get("DTYPE") == triton.language.float32 and constexprs.get("ALIGNED"):
            assert re.search(r"ld\.global(\.\w+)*\.v4\.", ptx), f"{what}: float32 loads are not vectorized"
        int8 = constexprs.get("S_DTYPE") == triton.language.int8
        if int8 and constexprs.get("PASS") != 1:  # LAMB's pass 1 with other storage writes nothing
            assert re.search(r"\bcvt\.rni\.f32\.f32\b", ptx), f"{what}: int8 codes are not rounded half to even"
        master = constexprs.get("M_DTYPE") is not None or constexprs.get("COUNTER_COL", -1) >= 0
        print("compiled", kernel.fn.__name__, *(["int8"] if int8 else []), *(["master"] if master else []), flush=True)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") != "1"
    _compile_all(_record_launches())
