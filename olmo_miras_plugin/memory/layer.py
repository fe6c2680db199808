"""The neural memory layer: projections and gates around the memory scan (scan.py)."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from olmo_core.config import DType

from . import fusion, triton_scan
from .config import MemoryImpl, NeuralMemoryConfig
from .conv import ShortCausalConv
from .cuda_graphs import GraphedChunkedScan
from .scan import Gates, MemoryRule, ScanState, chunked_scan, reference_scan
from .state import MemoryState

__all__ = ["NeuralMemory"]

# impl="triton_graphed" with the linear memory runs segments of at least this many tokens without
# the CUDA graph (GraphedChunkedScan's eager_from_tokens; docs/performance.md, sixth session).
LINEAR_EAGER_FROM_TOKENS = 16384


def _inner_dtype(dtype: torch.dtype) -> torch.dtype:
    """The memory state's dtype: at least float32 (float64 stays float64, for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


class NeuralMemory(nn.Module):
    """Titans/MIRAS neural long-term memory: a per-head network written by gradient steps at test time.

    ``forward(x, state) -> (y, state)``, x and y ``(batch, seq, d_model)``. Pass the returned state
    to the next call to continue the sequence; outputs are identical to a single call on the
    concatenation, wherever the split falls. Token t reads the memory as of the end of the
    previous chunk (``y_t = M_{c−1}(q_t)``), so outputs are strictly causal.

    The inner state (memory weights, momentum, gates) is kept in float32 whatever the autocast
    or parameter dtype: it accumulates many small updates that bf16 would round away.
    """

    def __init__(self, config: NeuralMemoryConfig, init_device: str = "cpu"):
        super().__init__()
        config.validate()
        self.config = config
        dtype = DType(config.dtype).as_pt()
        h, d, dm = config.n_heads, config.resolved_head_dim, config.d_model
        self.n_heads, self.head_dim, self.d_model = h, d, dm
        self.chunk_size = config.chunk_size
        self.impl = MemoryImpl(config.impl)
        self.signature = config.signature()

        lin = lambda i, o, bias=False: nn.Linear(i, o, bias=bias, dtype=dtype, device=init_device)  # noqa: E731
        self.w_q, self.w_k, self.w_v = lin(dm, h * d), lin(dm, h * d), lin(dm, h * d)
        self.w_theta = lin(dm, h, True)
        self.w_eta = lin(dm, h, True) if config.optimizer.uses_momentum else None
        self.w_alpha = lin(dm, h, True)
        self.conv = (
            ShortCausalConv(3 * h * d, config.conv_kernel, dtype=dtype, init_device=init_device)
            if config.conv_kernel > 0
            else None
        )
        architecture = config.architecture.build(d)
        self.memory_init = nn.ParameterList(
            [nn.Parameter(torch.empty(h, o, i, dtype=dtype, device=init_device)) for o, i in architecture.shapes]
        )
        self.o_norm_weight = nn.Parameter(torch.ones(d, dtype=dtype, device=init_device))
        self.w_out = lin(h * d, dm)
        self.rule = MemoryRule(
            architecture, config.objective.build(), config.retention.build(), config.optimizer.build()
        )
        self._graphed_scan = GraphedChunkedScan()
        self._graphed_triton_scan = GraphedChunkedScan(
            triton_scan.scan, eager_from_tokens=LINEAR_EAGER_FROM_TOKENS if architecture.depth == 1 else None
        )
        self.last_diagnostics: Optional[Dict[str, torch.Tensor]] = None
        self.record_diagnostics = False
        if init_device != "meta":
            self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(
        self, std: float = 0.02, out_std: Optional[float] = None, generator: Optional[torch.Generator] = None
    ) -> None:
        """Projections ~ N(0, std); output ~ N(0, out_std) (0 makes the layer output exactly 0)."""
        for w in (self.w_q, self.w_k, self.w_v, self.w_theta, self.w_alpha, self.w_eta):
            if w is not None:
                nn.init.normal_(w.weight, std=std, generator=generator)
        biases = self.config.gate_biases()
        self.w_theta.bias.fill_(biases["theta"])
        self.w_alpha.bias.fill_(biases["alpha"])
        if self.w_eta is not None:
            self.w_eta.bias.fill_(biases["eta"])
        if self.conv is not None:
            self.conv.reset_parameters(generator=generator)
        for i, p in enumerate(self.memory_init):
            for head in range(p.shape[0]):
                self.rule.architecture.init_weight_(p[head], i, generator=generator)
        self.o_norm_weight.fill_(1.0)
        out_std = std if out_std is None else out_std
        if out_std == 0:
            self.w_out.weight.zero_()
        else:
            nn.init.normal_(self.w_out.weight, std=out_std, generator=generator)

    # ------------------------------------------------------------------ state
    def init_state(
        self, batch_size: int, device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32
    ) -> MemoryState:
        """The memory before any token: the learned initial weights, zero momentum.

        ``dtype`` is that of the inputs to come: the state is float32, or float64 for float64 inputs.
        """
        device = device or self.memory_init[0].device
        dt = _inner_dtype(dtype)
        accum = [p.to(device=device, dtype=dt).unsqueeze(0).expand(batch_size, *p.shape) for p in self.memory_init]
        momentum = [torch.zeros_like(a) for a in accum] if self.rule.optimizer.uses_momentum else None
        read = [self.rule.retention.materialize(a) for a in accum]
        conv = None
        if self.conv is not None:
            conv = self.conv.empty_context(batch_size, device, dt)
        return MemoryState(accum, momentum, read, conv, 0, self.signature)

    def _check_state(self, state: MemoryState, x: torch.Tensor) -> None:
        if not isinstance(state, MemoryState):
            raise TypeError(f"state must be a MemoryState or None, got {type(state).__name__}")
        if state.signature != self.signature:
            raise ValueError(
                "memory state comes from a different config:\n"
                f"  state:  {state.signature}\n  layer:  {self.signature}"
            )
        if state.batch_size != x.shape[0]:
            raise ValueError(f"memory state has batch size {state.batch_size} but the input has {x.shape[0]}")
        want = _inner_dtype(x.dtype)
        have = state.accum[0]
        if have.dtype != want or have.device != x.device:
            raise ValueError(
                f"memory state is {have.dtype} on {have.device}, but {x.dtype} input on {x.device} needs a "
                f"{want} state on {x.device}: make it with layer.init_state(batch, device=x.device, dtype=x.dtype)"
            )

    # ------------------------------------------------------------------ forward
    def _gate_projections(self) -> List[nn.Linear]:
        """θ, α (, η): the order of the gate logits everywhere below."""
        return [self.w_theta, self.w_alpha] + ([self.w_eta] if self.w_eta is not None else [])

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """``[q | k | v | gate logits]`` ``(batch, seq, 3·heads·head_dim + n_gates·heads)``.

        One GEMM for all of them (weights concatenated on the fly; the parameters stay separate
        for checkpoints and optimizer groups). Separately, the three ``d_model → heads`` gate
        projections cost more than q, k, v together on a GPU: their weight gradients are
        ``heads × T`` by ``T × d_model`` products that cuBLAS runs on a handful of SMs. The output
        stays one tensor: :func:`fusion.prepare` splits it, so its gradient is written in place
        (a ``split`` here would concatenate the pieces' gradients in backward).
        """
        gate_lins = self._gate_projections()
        weight = torch.cat([self.w_q.weight, self.w_k.weight, self.w_v.weight, *(g.weight for g in gate_lins)])
        n_qkv = 3 * self.n_heads * self.head_dim
        qkv_bias = torch.zeros(n_qkv, dtype=self.w_theta.bias.dtype, device=self.w_theta.bias.device)
        return F.linear(x, weight, torch.cat([qkv_bias, *(g.bias for g in gate_lins)]))

    def gates(self, x: torch.Tensor) -> Gates:
        """Per-token gates ``(batch, heads, seq)`` in float32."""
        return self._gates_from_logits(x.dtype, [g(x) for g in self._gate_projections()])

    def _gates_from_logits(self, dtype: torch.dtype, logits: List[torch.Tensor]) -> Gates:
        """Gates from the θ, α (, η) logits ``(batch, seq, heads)``, in :meth:`_gate_projections` order."""
        return fusion.gates_from_logits(logits, _inner_dtype(dtype), self.config.theta_max, self.config.eta_max)

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, state: Optional[MemoryState] = None
    ) -> Tuple[torch.Tensor, MemoryState]:
        if x.ndim != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"expected input of shape (batch, seq, {self.d_model}), got {tuple(x.shape)}")
        if self.config.check_finite and not bool(torch.isfinite(x).all()):
            raise ValueError("NeuralMemory got a non-finite input (NaN or Inf); refusing to write it to memory")
        if state is None:
            state = self.init_state(x.shape[0], x.device, x.dtype)
        else:
            self._check_state(state, x)
        if x.shape[1] == 0:
            return x.new_zeros(x.shape), state

        z = self._project(x)
        dt = _inner_dtype(x.dtype)
        # w_out's GEMM input dtype: the read-outs are cast once, straight from the norm.
        device = x.device.type
        autocast = torch.is_autocast_enabled(device) and x.dtype != torch.float64
        out_dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
        conv_weight, conv_ctx = None, state.conv
        if self.conv is not None:
            conv_weight = self.conv.weight
            if conv_ctx is None:
                conv_ctx = self.conv.empty_context(x.shape[0], x.device, dt)
        with torch.autocast(device_type=device, enabled=False):
            q, k, v, gates, conv_ctx = fusion.prepare(
                z,
                conv_weight,
                conv_ctx,
                n_heads=self.n_heads,
                head_dim=self.head_dim,
                qk_norm=self.config.qk_norm,
                theta_max=self.config.theta_max,
                eta_max=self.config.eta_max,
                dtype=dt,
            )
            scan_state = ScanState(state.accum, state.momentum, state.read_weights, state.position)
            y, new = self.truncated_scan(scan_state, k, v, q, gates)
            y = fusion.finish(y, self.o_norm_weight, out_dtype)

        if self.record_diagnostics:
            self.last_diagnostics = self._diagnostics(gates, new)
        new_state = MemoryState(new.accum, new.momentum, new.read_weights, conv_ctx, new.position, self.signature)
        return self.w_out(y), new_state

    def truncated_scan(
        self, state: ScanState, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, gates: Gates
    ) -> Tuple[torch.Tensor, ScanState]:
        """:meth:`scan`, with the state detached at every multiple of ``config.backprop_span``
        (absolute positions, so where a sequence is split between calls does not move the cuts)."""
        span, t = self.config.backprop_span, k.shape[2]
        if span is None or not torch.is_grad_enabled():
            return self.scan(state, k, v, q, gates)
        start = state.position
        if start > 0 and start % span == 0:  # a cut where this call starts: the state it was given
            state = state.detach()
        cuts = [p - start for p in range((start // span + 1) * span, start + t, span)]
        if not cuts:
            return self.scan(state, k, v, q, gates)
        sizes = [b - a for a, b in zip([0, *cuts], [*cuts, t])]
        # One split per input, not a slice per piece: a split's backward writes each piece's
        # gradient into one tensor, slices' would add full-size zero-padded gradients (measured
        # 2.7 ms per OLMo2-1B step at 8k with four pieces in four layers).
        pieces = zip(k.split(sizes, 2), v.split(sizes, 2), q.split(sizes, 2), *(g.split(sizes, 2) for g in gates))
        outs: List[torch.Tensor] = []
        for i, (k_, v_, q_, *g_) in enumerate(pieces):
            if i > 0:  # a cut: this piece starts from the same values, outside the graph
                state = state.detach()
            y, state = self.scan(state, k_, v_, q_, Gates(*g_))
            outs.append(y)
        return torch.cat(outs, dim=2), state

    def scan(
        self, state: ScanState, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, gates: Gates
    ) -> Tuple[torch.Tensor, ScanState]:
        """The memory read/write over ``(batch, heads, seq, head_dim)`` inputs with ``self.impl``
        (everything of :meth:`forward` between the projections and the output norm)."""
        if self.impl == MemoryImpl.reference:
            return reference_scan(self.rule, state, k, v, q, gates, self.chunk_size)
        if self.impl == MemoryImpl.graphed:
            return self._graphed_scan(self.rule, state, k, v, q, gates, self.chunk_size)
        if self.impl == MemoryImpl.triton:
            return triton_scan.scan(self.rule, state, k, v, q, gates, self.chunk_size)
        if self.impl == MemoryImpl.triton_graphed:
            return self._graphed_triton_scan(self.rule, state, k, v, q, gates, self.chunk_size)
        compiled = self.impl == MemoryImpl.compiled
        return chunked_scan(self.rule, state, k, v, q, gates, self.chunk_size, compiled=compiled)

    @torch.no_grad()
    def _diagnostics(self, gates: Gates, state: ScanState) -> Dict[str, torch.Tensor]:
        # θ/(1 − η): the step a persistent surprise direction gets once momentum has built up. Its
        # largest value over tokens and heads is what the outer gradients' growth follows (past
        # ~0.03 at C = 64 on aligned inputs; docs/memory.md, "Inner step size and backprop span").
        step = gates.theta if self.w_eta is None else gates.theta / (1 - gates.eta)
        out = {
            "theta": gates.theta.mean(),
            "alpha": gates.alpha.mean(),
            "memory_weight_norm": torch.stack([w.float().norm(dim=(-2, -1)).mean() for w in state.read_weights]).sum(),
            "effective_step_max": step.max(),
        }
        if self.w_eta is not None:
            out["eta"] = gates.eta.mean()
        return out

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"preset={c.preset}, heads={self.n_heads}x{self.head_dim}, chunk={self.chunk_size}, "
            f"shapes={self.rule.architecture.shapes}, objective={c.objective.name}, "
            f"retention={c.retention.name}, optimizer={c.optimizer.name}, impl={self.impl}"
        )
