"""OLMo-core's ``TransformerTrainModule`` with the hooks memory training needs.

- **Parameter groups**: memory weights and gates get their own optimizer groups (OLMo-core
  ``OptimGroupOverride``) with their own LR / weight decay; the base keeps the optimizer's
  defaults. Only parameters with ``requires_grad`` reach the optimizer (OLMo-core's
  ``build_groups`` already skips frozen ones), so a frozen base (``model.freeze_base``) costs no
  optimizer state.
- **Segment-stateful training**: with ``segment_length`` set, each instance is fed as consecutive
  segments with memory state carried from one to the next (the block state API,
  :func:`~olmo_miras_plugin.blocks.carry_memory_states`), so the model trains on instances far
  longer than its attention window. Backprop is truncated every ``bptt_segments`` segments.
- **Checkpoints**: loading a *base* checkpoint (no memory parameters at all: a pretrained OLMo)
  fills the base and keeps the memory's initialisation; any other mismatch between checkpoint and
  model fails with the offending parameter names and shapes.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, replace
from fnmatch import fnmatch
from typing import Any, Dict, Generator, Iterator, List, Optional, Set, Tuple, Union, cast

import torch
import torch.distributed.checkpoint.state_dict as dist_cp_sd
import torch.nn as nn
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from olmo_core.config import DType
from olmo_core.distributed.parallel import DataParallelType
from olmo_core.distributed.utils import get_local_tensor
from olmo_core.exceptions import OLMoConfigurationError
from olmo_core.nn.lm_head import LMOutputWithLoss
from olmo_core.nn.transformer import Transformer
from olmo_core.optim import OptimConfig, OptimGroupOverride
from olmo_core.train.train_module import TransformerTrainModule, TransformerTrainModuleConfig

from ..blocks import LM2MemoryBank, MirasMemoryParts, carry_memory_states, detach_memory_states, memory_state_modules
from ..memory import NeuralMemory

__all__ = [
    "CheckpointMismatchError",
    "MirasTrainModule",
    "MirasTrainModuleConfig",
    "ParamGroups",
    "classify_parameters",
    "memory_group_overrides",
]

log = logging.getLogger(__name__)


class CheckpointMismatchError(OLMoConfigurationError):
    """A checkpoint's parameters (or optimizer state) don't match the model being trained."""


# ---------------------------------------------------------------------------------------------- groups
@dataclass
class ParamGroups:
    """Trainable parameter names by role (names as ``model.named_parameters()`` gives them)."""

    memory: List[str]
    """Memory-side weights (projections, memory MLP init, norms, persistent tokens, LM2 slots)."""
    gates: List[str]
    """Gates: θ/η/α projections, the MAG gate, MAC's context gate, LM2's gates."""
    base: List[str]
    """Everything else that is trainable (the OLMo base, unless frozen)."""
    frozen: List[str]

    def count(self, model: nn.Module) -> Dict[str, int]:
        sizes = {n: p.numel() for n, p in model.named_parameters()}
        return {k: sum(sizes[n] for n in getattr(self, k)) for k in ("memory", "gates", "base", "frozen")}


def _gate_params(module: nn.Module) -> Iterator[nn.Parameter]:
    if isinstance(module, NeuralMemory):
        for lin in (module.w_theta, module.w_eta, module.w_alpha):
            if lin is not None:
                yield from lin.parameters()
    elif isinstance(module, MirasMemoryParts):
        if module.gate is not None:
            yield from module.gate.parameters()
        if module.context_gate is not None:
            yield module.context_gate
    elif isinstance(module, LM2MemoryBank):
        for lin in (module.w_gate, module.w_in, module.w_forget):
            yield from lin.parameters()


def classify_parameters(model: nn.Module) -> ParamGroups:
    """Split ``model``'s parameters into memory / gates / base / frozen by *module identity*
    (not by name), so wrappers that rename parameters (activation checkpointing, FSDP) don't matter."""
    memory_ids: Set[int] = set()
    gate_ids: Set[int] = set()
    for module in model.modules():
        if isinstance(module, MirasMemoryParts):
            memory_ids.update(id(p) for p in module.parameters())
        gate_ids.update(id(p) for p in _gate_params(module))
    groups = ParamGroups(memory=[], gates=[], base=[], frozen=[])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            groups.frozen.append(name)
        elif id(p) in gate_ids:
            groups.gates.append(name)
        elif id(p) in memory_ids:
            groups.memory.append(name)
        else:
            groups.base.append(name)
    return groups


def _opts(lr: Optional[float], weight_decay: Optional[float]) -> Dict[str, Any]:
    opts: Dict[str, Any] = {}
    if lr is not None:
        opts["lr"] = lr
    if weight_decay is not None:
        opts["weight_decay"] = weight_decay
    return opts


def memory_group_overrides(
    model: nn.Module,
    optim: OptimConfig,
    *,
    memory_lr: Optional[float] = None,
    memory_weight_decay: Optional[float] = None,
    gate_lr: Optional[float] = None,
    gate_weight_decay: Optional[float] = None,
) -> OptimConfig:
    """A copy of ``optim`` whose ``group_overrides`` add a memory group and a gate group (exact
    parameter names of ``model``) after the config's own overrides.

    Where one of the config's own overrides also matches memory or gate parameters, those get the
    memory (gate) options updated by that override's, so e.g. ``{weight_decay: 0.0}`` on memory norms
    keeps ``memory_lr``: the override is split by parameter role into exact-name groups.
    """
    groups = classify_parameters(model)
    roles = {
        "memory": (groups.memory, _opts(memory_lr, memory_weight_decay)),
        "gates": (groups.gates, _opts(gate_lr, gate_weight_decay)),
    }
    role_of = {n: role for role, (names, _) in roles.items() for n in names}
    all_names = [n for n, _ in model.named_parameters()]
    trainable = groups.memory + groups.gates + groups.base
    out: List[OptimGroupOverride] = []
    claimed: Set[str] = set()
    for g_idx, go in enumerate(optim.group_overrides or []):
        matched = [n for n in trainable if any(fnmatch(n, pat) for pat in go.params)]
        if not any(n in role_of for n in matched):
            out.append(go)  # no memory parameter in it: passed on as written
            continue
        for pat in go.params:  # what OLMo-core would check on the patterns we replace by names
            if not any(fnmatch(n, pat) for n in all_names):
                raise OLMoConfigurationError(
                    f"optim group {g_idx} override pattern '{pat}' does not match any parameters"
                )
        base = [n for n in matched if n not in role_of]
        if base:
            out.append(OptimGroupOverride(params=base, opts=dict(go.opts)))
        for role, (_, opts) in roles.items():
            names = [n for n in matched if role_of.get(n) == role]
            if names:
                out.append(OptimGroupOverride(params=names, opts={**opts, **go.opts}))
        claimed.update(matched)
    for names, opts in roles.values():
        rest = [n for n in names if n not in claimed]
        if rest:
            out.append(OptimGroupOverride(params=rest, opts=opts))
    return replace(optim, group_overrides=out or None)


class _DropRecord(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# ---------------------------------------------------------------------------------------------- module
class MirasTrainModule(TransformerTrainModule):
    """``TransformerTrainModule`` + memory/gate optimizer groups, segment-stateful training and
    checkpoint checks (see the module docstring). Build it with :class:`MirasTrainModuleConfig`."""

    def __init__(
        self,
        model: Transformer,
        optim: OptimConfig,
        *,
        memory_lr: Optional[float] = None,
        memory_weight_decay: Optional[float] = None,
        gate_lr: Optional[float] = None,
        gate_weight_decay: Optional[float] = None,
        segment_length: Optional[int] = None,
        bptt_segments: Optional[int] = 1,
        eval_only: bool = False,
        **kwargs: Any,
    ):
        self.segment_length = segment_length
        self.bptt_segments = bptt_segments
        self._segment_phase: Optional[str] = None
        self._replay_keys: Dict[Tuple[Any, ...], torch.Tensor] = {}
        self._load_opts_saved: Optional[dist_cp_sd.StateDictOptions] = None
        # The parent builds the optimizer right after wrapping the model (AC / FSDP), and the
        # memory groups need the wrapped model's parameter names, so it is built here instead.
        parent_log = logging.getLogger(TransformerTrainModule.__module__)
        drop = _DropRecord("Skipping optimizer build because eval_only=True")
        parent_log.addFilter(drop)
        try:
            super().__init__(model=model, optim=optim, eval_only=True, **kwargs)
        finally:
            parent_log.removeFilter(drop)
        self.eval_only = eval_only
        if segment_length is not None and not memory_state_modules(self.model):
            raise OLMoConfigurationError(
                f"segment_length={segment_length} needs a model with stateful memory blocks "
                "(a MirasModelConfig); this model has none"
            )
        if segment_length is not None and self.dp_config is not None and self.dp_config.name == DataParallelType.ddp:
            # DDP's reducer expects one forward per backward; segments make several.
            raise OLMoConfigurationError(
                "segment-stateful training (train_module.segment_length) doesn't work with DDP; "
                "use FSDP/HSDP: --train_module.dp_config.name=fsdp"
            )
        if segment_length is not None:
            for mixer in memory_state_modules(self.model).values():
                cast(nn.Module, mixer).register_forward_pre_hook(self._stable_replay_key, with_kwargs=True)
        if not eval_only:
            self.optim = memory_group_overrides(
                self.model,
                optim,
                memory_lr=memory_lr,
                memory_weight_decay=memory_weight_decay,
                gate_lr=gate_lr,
                gate_weight_decay=gate_weight_decay,
            ).build(self.model, strict=True)
            self._log_groups()

    def _log_groups(self) -> None:
        groups = classify_parameters(self.model)
        sizes = groups.count(self.model)
        log.info(
            "Trainable parameters: memory %s, gates %s, base %s; frozen %s",
            *(f"{sizes[k]:,d} ({len(getattr(groups, k))} tensors)" for k in ("memory", "gates", "base", "frozen")),
        )
        if sum(sizes[k] for k in ("memory", "gates", "base")) == 0:
            raise OLMoConfigurationError("no trainable parameters: everything is frozen")

    # ------------------------------------------------------------------ segment-stateful training
    def _stable_replay_key(
        self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]
    ) -> Optional[Tuple[Tuple[Any, ...], Dict[str, Any]]]:
        """Give a stateful mixer the same ``state_key`` object when activation checkpointing
        recomputes a call as the original call had.

        The mixers remember each call's starting state under the *identity* of the block input
        (weakly) and replay it when checkpointing recomputes the block in backward. FSDP2, applied
        inside OLMo-core's checkpoint wrapper, hands the block a fresh alias of its input on every
        call (``RegisterPostBackwardFunction``), in the recomputation too, so identities never
        match and the recomputation would start from the wrong state. Aliases share storage, so
        the first tensor seen at a given storage (held until the backward that may replay it has
        run) stands in for all of them.
        """
        del module
        if self._segment_phase != "train" or not torch.is_grad_enabled():
            return None
        key = kwargs.get("state_key")
        if not isinstance(key, torch.Tensor):
            return None
        ident = (key.data_ptr(), key.storage_offset(), tuple(key.shape), key.stride(), key.dtype)
        canonical = self._replay_keys.setdefault(ident, key)
        if canonical is key:
            return None
        return args, {**kwargs, "state_key": canonical}

    @contextlib.contextmanager
    def _segments(self, phase: str) -> Generator[None, None, None]:
        if self.segment_length is None:
            yield
            return
        with carry_memory_states(self.model):
            self._segment_phase = phase
            try:
                yield
            finally:
                self._segment_phase = None
                self._replay_keys.clear()

    @contextlib.contextmanager
    def _train_microbatch_context(self, micro_batch_idx: int, num_micro_batches: int) -> Generator[None, None, None]:
        # The whole forward *and* backward of a micro-batch runs in stateful mode: activation
        # checkpointing replays block forwards during backward, from the carried states.
        with super()._train_microbatch_context(micro_batch_idx, num_micro_batches), self._segments("train"):
            yield

    @contextlib.contextmanager
    def _eval_batch_context(self) -> Generator[None, None, None]:
        with super()._eval_batch_context(), self._segments("eval"):
            yield

    def model_forward(
        self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None, **kwargs: Any
    ) -> Union[torch.Tensor, LMOutputWithLoss]:
        """One micro-batch. In segment mode: consecutive segments of ``segment_length`` tokens with
        the memory state carried across them; training runs ``backward`` itself every
        ``bptt_segments`` segments (then cuts the graph) and returns the last group's loss for
        the caller's ``backward``, with the CE / Z losses of all segments."""
        seg = self.segment_length
        seq_len = input_ids.shape[1]
        if self._segment_phase is None or seg is None or seq_len <= seg:
            return super().model_forward(input_ids, labels=labels, **kwargs)
        for key in ("doc_lens", "max_doc_lens"):
            if kwargs.get(key) is not None:
                raise OLMoConfigurationError(
                    "segment-stateful training doesn't support intra-document masking "
                    "(dataset.generate_doc_lengths): the memory state runs across the whole instance"
                )
        bounds = [(s, min(s + seg, seq_len)) for s in range(0, seq_len, seg)]

        def piece(s: int, e: int) -> Tuple[torch.Tensor, Optional[torch.Tensor], Dict[str, Any]]:
            kw = {
                k: v[:, s:e] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == seq_len else v
                for k, v in kwargs.items()
            }
            return input_ids[:, s:e], None if labels is None else labels[:, s:e], kw

        if self._segment_phase == "train":
            return self._train_segments(bounds, piece)
        return self._eval_segments(bounds, piece, kwargs.get("loss_reduction", "mean"))

    def _train_segments(self, bounds, piece) -> LMOutputWithLoss:
        k = self.bptt_segments or len(bounds)
        pending: Optional[torch.Tensor] = None
        ce_total: Optional[torch.Tensor] = None
        z_total: Optional[torch.Tensor] = None
        for i, (s, e) in enumerate(bounds):
            ids, lab, kw = piece(s, e)
            out = super().model_forward(ids, labels=lab, **kw)
            assert isinstance(out, LMOutputWithLoss), "training forward must be given labels"
            pending = out.loss if pending is None else pending + out.loss
            ce = get_local_tensor(out.ce_loss.detach())
            ce_total = ce if ce_total is None else ce_total + ce
            if out.z_loss is not None:
                z = get_local_tensor(out.z_loss.detach())
                z_total = z if z_total is None else z_total + z
            if (i + 1) % k == 0 and i < len(bounds) - 1:
                pending.backward()  # truncated backprop: this group's graph ends here
                pending = None
                detach_memory_states(self.model)
                self._replay_keys.clear()
        if pending is None:  # pragma: no cover - the last segment always leaves a pending loss
            raise RuntimeError("no loss left for the final backward")
        assert ce_total is not None
        return LMOutputWithLoss(logits=None, loss=pending, ce_loss=ce_total, z_loss=z_total)

    def _eval_segments(self, bounds, piece, reduction: str) -> Union[torch.Tensor, LMOutputWithLoss]:
        if reduction == "mean":
            raise NotImplementedError("segment-stateful evaluation supports loss_reduction 'none' or 'sum'")
        outs = []
        for s, e in bounds:
            ids, lab, kw = piece(s, e)
            outs.append(super().model_forward(ids, labels=lab, **kw))

        def join(ts: List[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
            if any(t is None for t in ts):
                return None
            tensors = cast(List[torch.Tensor], ts)
            if tensors[0].dim() == 0:
                return torch.stack(tensors).sum()
            return torch.cat(tensors, dim=1)

        if isinstance(outs[0], torch.Tensor):
            return cast(torch.Tensor, join(cast(List[Optional[torch.Tensor]], outs)))
        fields = zip(*[cast(LMOutputWithLoss, o) for o in outs])
        return LMOutputWithLoss(*(join(list(f)) for f in fields))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ checkpoints
    def state_dict_to_load(self, metadata: Metadata, *, optim: Optional[bool] = None) -> Dict[str, Any]:
        """Check the checkpoint against the model first (names the mismatch); a base checkpoint
        without any memory parameters loads non-strictly, leaving the memory as initialised."""
        self._restore_load_opts()
        if optim is None:
            optim = self.optim is not None and any(k.startswith("optim.") for k in metadata.state_dict_metadata)
        is_base = self._check_checkpoint(metadata, optim=bool(optim))
        if is_base:
            log.info(
                "Checkpoint has the base model's parameters but no memory parameters: loading the "
                "base weights, the memory keeps its initialisation"
            )
            self._load_opts_saved = self.state_dict_load_opts
            self.state_dict_load_opts = replace(self.state_dict_load_opts, strict=False)
            optim = False
        return super().state_dict_to_load(metadata, optim=optim)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        try:
            super().load_state_dict(state_dict)
        finally:
            self._restore_load_opts()

    def _restore_load_opts(self) -> None:
        if self._load_opts_saved is not None:
            self.state_dict_load_opts = self._load_opts_saved
            self._load_opts_saved = None

    def _check_checkpoint(self, metadata: Metadata, *, optim: bool) -> bool:
        """Raise :class:`CheckpointMismatchError` naming what differs; ``True`` for a base checkpoint."""
        saved = metadata.state_dict_metadata
        model_sd = dist_cp_sd.get_model_state_dict(self.model, options=self.state_dict_load_opts)
        if self.load_key_mapping:
            return False  # the parent maps keys; leave the checks to it
        expected = {f"model.{k}": v for k, v in model_sd.items() if isinstance(v, torch.Tensor)}
        saved_model = {k for k in saved if k.startswith("model.")}
        memory_keys = {k for k in expected if ".miras." in k}
        missing = sorted(set(expected) - saved_model)
        unexpected = sorted(saved_model - set(expected))
        if missing and memory_keys and set(missing) == memory_keys and not unexpected:
            if not any(".miras." in k for k in saved_model):
                self._check_shapes(expected, saved, keys=set(expected) - memory_keys)
                return True
        problems: List[str] = []
        if missing:
            problems.append(f"{len(missing)} model parameter(s) missing from the checkpoint: {_some(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} checkpoint parameter(s) the model doesn't have: {_some(unexpected)}")
        try:
            self._check_shapes(expected, saved, keys=set(expected) & saved_model)
        except CheckpointMismatchError as e:
            problems.append(str(e))
        if problems:
            raise CheckpointMismatchError(
                "checkpoint doesn't match the model (was it saved with a different model config, "
                "e.g. memory.layers / memory.preset / memory.block_type / sizes?):\n  - " + "\n  - ".join(problems)
            )
        if optim:
            trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
            state_keys = {k for k in saved if k.startswith("optim.state.")}
            flat = any(k.startswith("optim.param_groups.") and not k.startswith("optim.param_groups.0.") for k in saved)
            if flat and state_keys:
                clean = [n.replace("_checkpoint_wrapped_module.", "") for n in trainable]
                no_state = [n for n in clean if not any(k.startswith(f"optim.state.{n}.") for k in state_keys)]
                if no_state:
                    raise CheckpointMismatchError(
                        f"checkpoint has no optimizer state for {len(no_state)} trainable parameter(s): "
                        f"{_some(no_state)}; the set of trainable parameters changed since it was saved "
                        "(e.g. model.freeze_base). Resume with the original setting, or start from it "
                        "with --trainer.load_path=<checkpoint> --trainer.load_optim_state=false and a new save folder"
                    )
        return False

    @staticmethod
    def _check_shapes(expected: Dict[str, torch.Tensor], saved: Dict[str, Any], keys: Set[str]) -> None:
        bad = []
        for k in sorted(keys):
            meta = saved.get(k)
            if isinstance(meta, TensorStorageMetadata) and tuple(meta.size) != tuple(expected[k].shape):
                bad.append(f"{k}: checkpoint {tuple(meta.size)} vs model {tuple(expected[k].shape)}")
        if bad:
            raise CheckpointMismatchError(f"{len(bad)} shape mismatch(es): {_some(bad)}")


def _some(items: List[str], n: int = 8) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


# ---------------------------------------------------------------------------------------------- config
@dataclass
class MirasTrainModuleConfig(TransformerTrainModuleConfig):
    """``TransformerTrainModuleConfig`` + the memory training hooks of :class:`MirasTrainModule`."""

    memory_lr: Optional[float] = None
    """LR of the memory weights; ``None``: the optimizer's ``lr``."""
    memory_weight_decay: Optional[float] = None
    """Weight decay of the memory weights; ``None``: the optimizer's."""
    gate_lr: Optional[float] = None
    """LR of the gates (θ/η/α, MAG gate, MAC context gate, LM2 gates); ``None``: the optimizer's."""
    gate_weight_decay: Optional[float] = 0.0
    """Weight decay of the gates (default 0: decaying them drags every gate towards σ(0) = 0.5)."""
    segment_length: Optional[int] = None
    """Feed each instance as consecutive segments of this many tokens, carrying the memory state
    (segment-stateful training); ``None``: whole instances, no carried state."""
    bptt_segments: Optional[int] = 1
    """Truncated backprop: backward and cut the graph every this many segments (``None``: the whole
    instance is one graph)."""

    def validate(self) -> None:
        if self.segment_length is not None:
            if not isinstance(self.segment_length, int) or self.segment_length <= 0:
                raise OLMoConfigurationError(
                    f"train_module.segment_length must be a positive integer, got {self.segment_length!r}"
                )
            if self.max_sequence_length % self.segment_length != 0:
                raise OLMoConfigurationError(
                    f"train_module.segment_length={self.segment_length} must divide "
                    f"train_module.max_sequence_length={self.max_sequence_length}"
                )
            if self.cp_config is not None:
                raise OLMoConfigurationError(
                    "segment-stateful training doesn't support context parallelism (cp_config)"
                )
            if self.dp_config is not None and self.dp_config.name == DataParallelType.ddp:
                raise OLMoConfigurationError(
                    "segment-stateful training (train_module.segment_length) doesn't work with DDP "
                    "(several forward passes per backward); use --train_module.dp_config.name=fsdp"
                )
        if self.bptt_segments is not None and (not isinstance(self.bptt_segments, int) or self.bptt_segments <= 0):
            raise OLMoConfigurationError(
                f"train_module.bptt_segments must be a positive integer or null, got {self.bptt_segments!r}"
            )
        if self.pp_config is not None:
            raise OLMoConfigurationError("pipeline parallelism (pp_config) is not supported for memory models")
        if self.rank_microbatch_size % self.max_sequence_length != 0:
            raise OLMoConfigurationError(
                f"train_module.rank_microbatch_size={self.rank_microbatch_size} must be a multiple of "
                f"train_module.max_sequence_length={self.max_sequence_length}"
            )

    @property
    def num_segments(self) -> int:
        return 1 if self.segment_length is None else math.ceil(self.max_sequence_length / self.segment_length)

    def build(  # type: ignore[override]
        self, model: Transformer, device: Optional[torch.device] = None, eval_only: bool = False
    ) -> MirasTrainModule:
        self.validate()
        kwargs = self.as_dict(exclude_none=True, recurse=False)
        if (precision := kwargs.pop("autocast_precision", None)) is not None:
            kwargs["autocast_precision"] = cast(DType, precision).as_pt()
        for key in ("state_dict_save_opts", "state_dict_load_opts"):
            if (opts := kwargs.pop(key, None)) is not None:
                kwargs[key] = dist_cp_sd.StateDictOptions(**opts)
        kwargs.setdefault("bptt_segments", None)
        return MirasTrainModule(model=model, device=device, eval_only=eval_only, **kwargs)
