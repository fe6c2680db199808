"""The Triton kernels fit an H100's shared memory at OLMo2-1B shapes, checked without a GPU.

Triton compiles for ``sm_90`` on any machine (its wheel ships ``ptxas``), and the compiled kernel
reports the shared memory it needs; a kernel that needs more than a block may have (227 KiB on an
H100) fails at launch on the GPU. The default launch settings of the tightest kernels are compiled
here with float32 inputs (the largest tiles) at head_dim 128, chunk 64, hidden 256.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from olmo_miras_plugin.memory import triton_linear, triton_mlp, triton_mlp_split, triton_prepare  # noqa: E402

H100_SHARED_BYTES = 232448  # per block, sm_90 (what triton reports as the hardware limit)


def _compile(fn, constexprs: dict, num_warps: int, num_stages: int = 1):
    from triton.backends.compiler import GPUTarget

    def arg_type(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if name in ("tau", "theta_max", "eta_max", "log_eta_max"):
            return "fp32"
        return "*fp32" if name.endswith("_ptr") or name.endswith("_save") else "i64"

    src = triton.compiler.ASTSource(fn=fn, signature={n: arg_type(n) for n in fn.arg_names}, constexprs=constexprs)
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    except triton.compiler.errors.CompilationError:
        raise  # the kernel's source (or the constexprs given here) is wrong: a failure, not a skip
    except Exception as e:  # noqa: BLE001 - e.g. a triton build without the NVIDIA backend or ptxas
        pytest.skip(f"cannot compile for sm_90 here: {type(e).__name__}: {str(e)[:200]}")
    return kernel


def _compile_shared_bytes(fn, constexprs: dict, num_warps: int, num_stages: int = 1) -> int:
    return int(_compile(fn, constexprs, num_warps, num_stages).metadata.shared)


@pytest.mark.skipif(triton_linear._interpreted(), reason="compiles real kernels")
@pytest.mark.parametrize(
    "name",
    [
        "mlp_forward", "mlp_backward", "linear_forward_whole_rows", "linear_backward_whole_rows",
        "split_forward", "split_backward_start", "split_backward_finish", "split_forward_clip", "split_norm_clip",
        "split_backward_start_clip", "split_backward_finish_clip",
        "split_forward_chain_tiles", "split_norm_chain_tiles",
        "split_read", "split_read_backward",
    ],
)
def test_kernels_fit_h100_shared_memory(name: str):
    mlp = dict(C=64, BD=128, CLIP=True, MOM=True, GELU=True, PREC="tf32")
    linear = dict(C=64, BD=128, BV=128, CLIP=True, PREC="tf32")
    # PDL: as launched on Hopper (programmatic dependent launch, the default there)
    # the split kernels take the head and hidden sizes as constexprs (D, F), as launched
    split = dict(C=64, BD=128, BF=triton_mlp_split.BLOCK, RB=triton_mlp_split.BF16_ROWS, MOM=True, GELU=True, PREC="tf32",
                 PDL=True, D=128, F=256)
    read = dict(C=64, BD=128, BF=triton_mlp_split.BLOCK, GELU=True, PREC="tf32", PDL=True, D=128, F=256)
    chain = {**split, "RB": triton_mlp_split.CHAIN_ROWS}
    finish = {**split, "RB": triton_mlp_split.FINISH_ROWS}
    S = triton_mlp_split
    cases = {
        "mlp_forward": (triton_mlp._mlp_fwd_kernel, {**mlp, "BF": triton_mlp.FWD_BLOCK, "SAVE": True}, triton_mlp.FWD_WARPS),
        "mlp_backward": (triton_mlp._mlp_bwd_kernel, {**mlp, "BF": triton_mlp.BWD_BLOCK}, triton_mlp.BWD_WARPS),
        # with the clip one program holds a head's whole state: the largest linear tiles
        "linear_forward_whole_rows": (triton_linear._fwd_kernel, {**linear, "SAVE": True}, 8),
        "linear_backward_whole_rows": (triton_linear._bwd_kernel, linear, 8),
        "split_forward": (triton_mlp_split._split_fwd_kernel, {**split, "READ": True, "CLIP": False},
                          triton_mlp_split.FWD_WARPS, triton_mlp_split.STAGES),
        "split_backward_start": (S._split_bwd_start_kernel, {**chain, "CLIP": False}, S.CHAIN_WARPS, 1),
        "split_backward_finish": (S._split_bwd_finish_kernel, {**finish, "CLIP": False}, S.FINISH_WARPS, S.FINISH_STAGES),
        # the clip: the forward's extra ‖D‖² launch and the backward's extra sums (xe, ∂L/∂σ)
        "split_forward_clip": (triton_mlp_split._split_fwd_kernel, {**split, "READ": True, "CLIP": True},
                               triton_mlp_split.FWD_WARPS, triton_mlp_split.STAGES),
        "split_norm_clip": (triton_mlp_split._split_norm_kernel, {k: v for k, v in split.items() if k != "MOM"},
                            triton_mlp_split.FWD_WARPS, triton_mlp_split.STAGES),
        # the forward chain's default tiles (64 rows, 8 warps), as the training forward runs them
        "split_forward_chain_tiles": (triton_mlp_split._split_fwd_kernel, {**chain, "READ": False, "CLIP": True},
                                      triton_mlp_split.CHAIN_WARPS, triton_mlp_split.STAGES),
        "split_norm_chain_tiles": (triton_mlp_split._split_norm_kernel, {k: v for k, v in chain.items() if k != "MOM"},
                                   triton_mlp_split.CHAIN_WARPS, triton_mlp_split.STAGES),
        "split_backward_start_clip": (S._split_bwd_start_kernel, {**chain, "CLIP": True}, S.CHAIN_WARPS, 1),
        "split_backward_finish_clip": (S._split_bwd_finish_kernel, {**finish, "CLIP": True}, S.FINISH_WARPS,
                                       S.FINISH_STAGES),
        # the read-outs, off the chain: a whole chunk per program, 4 warps (their default)
        "split_read": (triton_mlp_split._split_read_kernel, read, triton_mlp_split.FWD_WARPS, triton_mlp_split.STAGES),
        "split_read_backward": (triton_mlp_split._split_read_bwd_kernel, read, triton_mlp_split.FWD_WARPS,
                                triton_mlp_split.STAGES),
    }
    fn, constexprs, warps, *stages = cases[name]
    shared = _compile_shared_bytes(fn, constexprs, warps, *stages)
    assert 0 < shared <= H100_SHARED_BYTES, f"{name} needs {shared / 1024:.0f} KiB of shared memory"


@pytest.mark.skipif(triton_linear._interpreted(), reason="compiles real kernels")
@pytest.mark.parametrize("has_ctx", [True, False])
@pytest.mark.parametrize("name", ["forward", "backward_pass1", "backward_pass2", "gates_forward", "gates_backward"])
def test_prepare_kernels_compile_for_sm90(name: str, has_ctx: bool):
    """The input preparation's kernels at their defaults and OLMo2-1B shapes (the interpreter
    never compiles them: this is where CPU CI sees a kernel that would not build on a GPU)."""
    tp = triton_prepare
    part = dict(D=128, BD=128, BT=tp.ROWS, K=4, HAS_CONV=True, NORM=True, HAS_CTX=has_ctx)
    gates = dict(BT=tp.GATE_ROWS, BH=16, HAS_ETA=has_ctx)  # has_ctx stands for η here
    cases = {
        "forward": (tp._fwd_kernel, part),
        "backward_pass1": (tp._dpre_kernel, part),
        "backward_pass2": (tp._conv_t_kernel, dict(BC=tp.CONV_T_CHANNELS, BT=tp.ROWS, K=4, CTX_GRAD=True, HAS_CTX=has_ctx)),
        "gates_forward": (tp._gates_fwd_kernel, gates),
        "gates_backward": (tp._gates_bwd_kernel, gates),
    }
    fn, constexprs = cases[name]
    shared = _compile_shared_bytes(fn, constexprs, tp.WARPS)
    assert 0 <= shared <= H100_SHARED_BYTES


@pytest.mark.skipif(triton_linear._interpreted(), reason="compiles real kernels")
@pytest.mark.parametrize("pdl", [True, False])
@pytest.mark.parametrize("kernel", ["forward", "forward_clip", "norm", "backward_start", "backward_finish", "read_backward"])
def test_split_kernels_wait_for_the_previous_launch_only_with_pdl(kernel: str, pdl: bool):
    """With programmatic dependent launch a split kernel may read before it waits
    (``griddepcontrol.wait``) but must not write: a store or atomic before the wait could clobber
    what the previous launch is still reading. It lets the next launch start only after its wait.
    Without PDL neither instruction may be there (they need sm_90)."""
    S = triton_mlp_split
    chain = dict(C=64, BD=128, BF=S.BLOCK, RB=S.CHAIN_ROWS, MOM=True, GELU=True, PREC="tf32", PDL=pdl, D=128, F=256)
    fn, constexprs = {
        "forward": (S._split_fwd_kernel, {**chain, "READ": False, "CLIP": False}),
        "forward_clip": (S._split_fwd_kernel, {**chain, "READ": False, "CLIP": True}),
        "norm": (S._split_norm_kernel, {k: v for k, v in chain.items() if k != "MOM"}),
        "backward_start": (S._split_bwd_start_kernel, {**chain, "CLIP": True}),
        "backward_finish": (S._split_bwd_finish_kernel, {**chain, "RB": S.FINISH_ROWS, "CLIP": True}),
        "read_backward": (S._split_read_bwd_kernel, {k: v for k, v in chain.items() if k not in ("MOM", "RB")}),
    }[kernel]
    ptx = _compile(fn, constexprs, S.CHAIN_WARPS).asm["ptx"]
    body = ptx[ptx.index(".entry"):]
    assert ("griddepcontrol.wait" in body) == pdl
    assert ("griddepcontrol.launch_dependents" in body) == pdl
    if pdl:
        wait = body.index("griddepcontrol.wait")
        writes = [body.find(op) for op in ("st.global", "atom.global", "red.global")]
        assert min(w for w in writes if w >= 0) > wait, "a write before griddepcontrol.wait"
        assert body.index("griddepcontrol.launch_dependents") > wait
