"""CUDA-graph capture of a scan (``impl="graphed"``: the compiled chunked scan; ``impl="triton_graphed"``:
the Triton kernels).

The chunked scan is a loop of T / C small steps; on a GPU its cost is kernel-launch and Python
overhead, not arithmetic. Capturing the whole forward and backward once per input signature
(``torch.cuda.make_graphed_callables``) and replaying it removes that overhead.

Rules that keep replays correct:
- one graph per signature (shapes, dtypes, requires_grad, position mod C); a new signature
  captures a new graph (a few warm-up iterations);
- a graph whose forward was replayed but whose backward has not run yet is *busy*: a second
  call with the same signature before ``backward`` (the next piece of a sequence cut by
  ``backprop_span``, or the next segment) gets a graph of its own, up to
  :data:`MAX_GRAPHS_PER_SIGNATURE`, then runs eagerly, instead of overwriting the first call's
  saved activations;
- outputs are cloned out of the graph's static buffers, so states a caller keeps are never
  overwritten by a later replay.
Graphs hold their activations in a private memory pool for the life of the layer: use this for
fixed-shape training loops.

Without gradients (inference: streaming a document segment by segment) a signature's first call
of whole chunks from a chunk boundary runs eagerly and its second captures a forward-only graph
that later calls replay (other pieces, such as generation's single tokens, run eagerly); at most
:data:`INFERENCE_GRAPHS` signatures get one (then calls run eagerly), so evaluating documents of
many lengths neither captures without end nor holds a pool per length.
"""

from __future__ import annotations

from typing import Callable, Dict, Hashable, List, Optional, Set, Tuple

import torch

from .scan import Gates, MemoryRule, ScanState, chunked_scan

__all__ = ["GraphedChunkedScan", "INFERENCE_GRAPHS", "MAX_GRAPHS_PER_SIGNATURE"]

MAX_GRAPHS_PER_SIGNATURE = 16
"""Graphs of one signature that can hold activations at once (a 32k sequence cut every 2k tokens
needs 16); each keeps its own activations, so together they hold what one graph of the whole
sequence would."""


INFERENCE_GRAPHS = 4
"""Signatures of gradient-free calls that get a graph (a stream of fixed-size segments needs one;
its first segment, from the initial state, may share it)."""


ScanFn = Callable[[MemoryRule, ScanState, torch.Tensor, torch.Tensor, torch.Tensor, Gates, int], Tuple[torch.Tensor, ScanState]]


def _compiled_chunked_scan(rule, state, k, v, q, gates, chunk_size):
    return chunked_scan(rule, state, k, v, q, gates, chunk_size, compiled=True)


class _InferenceGraph:
    """One gradient-free call of ``fn`` captured: inputs are copied into static buffers, the graph
    replays, outputs are cloned out (a caller's state never aliases the graph's buffers)."""

    def __init__(self, fn: Callable[..., Tuple[torch.Tensor, ...]], sample: List[torch.Tensor]) -> None:
        self._inputs = [t.detach().clone() for t in sample]
        side = torch.cuda.Stream()  # warm-up off the capture (allocator and lazy init), as torch advises
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*self._inputs)
        torch.cuda.current_stream().wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._outputs = fn(*self._inputs)

    def __call__(self, *ts: torch.Tensor) -> List[torch.Tensor]:
        for dst, src in zip(self._inputs, ts):
            dst.copy_(src)
        self._graph.replay()
        return [o.clone() for o in self._outputs]


class GraphedChunkedScan:
    """``scan_fn`` (default: the ``torch.compile``d chunked scan) replayed from CUDA graphs."""

    def __init__(self, scan_fn: Optional[ScanFn] = None, eager_from_tokens: Optional[int] = None) -> None:
        """``eager_from_tokens``: segments of at least this many tokens run eagerly. A graph's
        inputs are copied into its static buffers on every replay, which costs more than the
        launches it saves once those are few and the tensors large (the linear memory's Triton
        scan: three kernels; on an H100 the graph wins 1.3 vs 3.5 ms at 4k tokens and loses
        4.05 vs 3.75 ms at 16k)."""
        self._scan_fn: ScanFn = scan_fn or _compiled_chunked_scan
        self._eager_from_tokens = eager_from_tokens
        self._graphs: Dict[Hashable, Callable] = {}
        self._busy: Set[Hashable] = set()
        self._inference_graphs: Dict[Hashable, _InferenceGraph] = {}
        self._inference_calls: Dict[Hashable, int] = {}

    def __call__(
        self, rule: MemoryRule, state: ScanState, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor, gates: Gates, chunk_size: int
    ) -> Tuple[torch.Tensor, ScanState]:
        n_layers = len(state.accum)
        has_momentum = state.momentum is not None
        # Read weights that *are* the accumulator (identity retention at a chunk boundary) go in
        # once and come out once: the scan inside then sees them as one tensor, as the caller
        # has them (the Triton kernel needs that to start at chunk 0).
        share_in = all(r is a for r, a in zip(state.read_weights, state.accum))
        left = state.position % chunk_size
        share_out = rule.retention.is_identity and (left + k.shape[2]) % chunk_size == 0
        flat: List[torch.Tensor] = [*state.accum, *(state.momentum or []), *([] if share_in else state.read_weights), k, v, q]
        flat += [gates.theta, gates.log_eta, gates.log_keep]
        eager = lambda: self._scan_fn(rule, state, k, v, q, gates, chunk_size)  # noqa: E731
        if (
            not k.is_cuda
            or torch.cuda.is_current_stream_capturing()
            or (self._eager_from_tokens is not None and k.shape[2] >= self._eager_from_tokens)
        ):
            return eager()
        signature = (left, chunk_size, share_in, share_out, tuple((tuple(t.shape), t.dtype, t.requires_grad) for t in flat))

        def scan_fn(*ts: torch.Tensor) -> Tuple[torch.Tensor, ...]:
            i = 0
            accum = list(ts[i : i + n_layers]); i += n_layers  # noqa: E702
            momentum = None
            if has_momentum:
                momentum = list(ts[i : i + n_layers]); i += n_layers  # noqa: E702
            read = accum
            if not share_in:
                read = list(ts[i : i + n_layers]); i += n_layers  # noqa: E702
            k_, v_, q_, theta, log_eta, log_keep = ts[i:]
            g = Gates(theta, theta, theta, log_eta, log_keep)  # the chunked scan reads θ, log η, log(1−α)
            out, new = self._scan_fn(rule, ScanState(accum, momentum, read, left), k_, v_, q_, g, chunk_size)
            return (out, *new.accum, *(new.momentum or []), *([] if share_out else new.read_weights))

        if not torch.is_grad_enabled() or not any(t.requires_grad for t in flat):
            # inference: only whole chunks from a chunk boundary (segments of a stream), not the
            # partial pieces of token-by-token generation; not under inference_mode, whose tensors
            # (the graph's static inputs would be some) refuse in-place copies outside it
            whole = left == 0 and k.shape[2] % chunk_size == 0 and not torch.is_inference_mode_enabled()
            outs = self._inference_call(signature, scan_fn, flat) if whole else None
            if outs is None:
                return eager()
        else:
            key = next(((signature, i) for i in range(MAX_GRAPHS_PER_SIGNATURE) if (signature, i) not in self._busy), None)
            if key is None:
                return eager()
            graphed = self._graphs.get(key)
            if graphed is None:
                sample = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in flat)
                graphed = torch.cuda.make_graphed_callables(scan_fn, sample)
                self._graphs[key] = graphed
            outs = [o.clone() for o in graphed(*flat)]
            if outs[0].requires_grad:
                self._busy.add(key)
                outs[0].register_hook(lambda grad: (self._busy.discard(key), grad)[1])
        out, rest = outs[0], outs[1:]
        accum = rest[:n_layers]
        momentum = rest[n_layers : 2 * n_layers] if has_momentum else None
        read = accum if share_out else rest[-n_layers:]
        return out, ScanState(accum, momentum, read, state.position + k.shape[2])

    def _inference_call(self, signature: Hashable, scan_fn: Callable, flat: List[torch.Tensor]) -> Optional[List[torch.Tensor]]:
        """A gradient-free call from its graph (captured at the signature's second call), or None:
        run it eagerly (a first call, or :data:`INFERENCE_GRAPHS` signatures have graphs already)."""
        graph = self._inference_graphs.get(signature)
        if graph is None:
            if len(self._inference_graphs) >= INFERENCE_GRAPHS:
                return None
            calls = self._inference_calls.get(signature, 0) + 1
            if calls < 2:
                if len(self._inference_calls) >= 16 * INFERENCE_GRAPHS:  # many one-off lengths: forget them
                    self._inference_calls.clear()
                self._inference_calls[signature] = calls
                return None
            with torch.no_grad():
                graph = _InferenceGraph(scan_fn, flat)
            self._inference_graphs[signature] = graph
        return graph(*flat)
