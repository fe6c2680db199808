"""OLMo-core callbacks for memory training: diagnostics, W&B (offline-capable), HF weights.

Everything is recorded with ``trainer.record_metric`` so it reaches the console logger (add
``"memory/*"`` to its ``metrics``), W&B, Comet and the metric saver like any OLMo-core metric.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from olmo_core.distributed.utils import get_rank
from olmo_core.exceptions import OLMoConfigurationError, OLMoEnvironmentError
from olmo_core.train.callbacks import Callback, WandBCallback
from olmo_core.train.callbacks.wandb import WANDB_API_KEY_ENV_VAR
from olmo_core.train.common import ReduceType

from ..blocks import LM2MemoryBank, MirasMemoryParts
from ..memory import MemoryImpl, NeuralMemory

__all__ = ["HFPretrainedWeightsCallback", "MemoryDiagnosticsCallback", "MirasWandBCallback"]

log = logging.getLogger(__name__)

_BLOCK_RE = re.compile(r"blocks\.(\d+)\.")


def _layer_of(name: str) -> str:
    m = _BLOCK_RE.search(name)
    return f"layer{m.group(1)}" if m else name.replace("_checkpoint_wrapped_module.", "")


def _global_grad_norm(grads: List[torch.Tensor]) -> torch.Tensor:
    """L2 norm of the full (unsharded) gradients, the same value on every rank.

    A DTensor's norm is reduced over its own mesh (shards summed, replicas counted once), so this
    is right for FSDP (sharded), HSDP (sharded and replicated) and DDP (plain, identical) grads.
    Collective for DTensor grads: every rank must call it with the same parameters.
    """
    norms = []
    for g in grads:
        n = torch.linalg.vector_norm(g.detach().float())
        norms.append(n.full_tensor() if hasattr(n, "full_tensor") else n)
    return torch.linalg.vector_norm(torch.stack(norms))


class _SurpriseRecorder:
    """Stands in for a memory's inner optimizer (``rule.optimizer``) while diagnostics are on.

    Both memory scans hand the optimizer's ``clip_scale`` the per-token squared norm of the inner
    gradient ∇ℓ(M; k_t, v_t), the "surprise"; this proxy records it and defers everything to the
    real optimizer, so the memory computes exactly what it computes without it.
    """

    def __init__(self, inner: Any, sink: Callable[[torch.Tensor], None]):
        self._inner = inner
        self._sink = sink

    def clip_scale(self, sq_norm: torch.Tensor) -> Optional[torch.Tensor]:
        self._sink(sq_norm.detach())
        return self._inner.clip_scale(sq_norm)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


@dataclass
class MemoryDiagnosticsCallback(Callback):
    """Per memory layer: surprise (inner-gradient) norm, mean gates θ / η / α, memory weight norm,
    the gradient norm of the layer's own parameters (``grad_norm``: the first thing to watch, since
    it grows exponentially with the backprop span once the inner step is too large; docs/memory.md),
    the largest effective inner step θ/(1 − η) (``effective_step_max``: what that growth follows),
    plus the MAG gate, MAC context gate and LM2 gates, as ``memory/layer<i>/<name>`` metrics.

    Values are means over every memory call of the step (all micro-batches and segments; ``*_max``
    metrics: maxima, also over ranks), on steps that are multiples of ``interval``; off-steps cost
    nothing.
    """

    enabled: bool = True
    interval: int = 1
    """Record on steps that are multiples of this."""
    surprise: bool = True
    """Record the surprise norm (eager memory implementations only: ``chunked`` / ``reference``)."""

    def __post_init__(self) -> None:
        self._active = False
        self._handles: List[RemovableHandle] = []
        self._sums: Dict[str, torch.Tensor] = {}
        self._counts: Dict[str, int] = defaultdict(int)
        self._memories: List[Tuple[str, NeuralMemory]] = []
        self._swapped: List[Tuple[NeuralMemory, Any]] = []

    # ------------------------------------------------------------------ hooks
    def pre_train(self) -> None:
        if not self.enabled:
            return
        if self.interval <= 0:
            raise OLMoConfigurationError(f"memory diagnostics interval must be positive, got {self.interval}")
        model = self.trainer.train_module.model  # type: ignore[attr-defined]
        for name, module in model.named_modules():
            layer = _layer_of(name)
            if isinstance(module, NeuralMemory):
                self._memories.append((layer, module))
                self._handles.append(module.register_forward_hook(self._memory_hook(layer)))
            elif isinstance(module, MirasMemoryParts) and module.gate is not None:
                self._handles.append(module.gate.register_forward_hook(self._sigmoid_hook(f"{layer}/mag_gate")))
            elif isinstance(module, LM2MemoryBank):
                for attr, label in (
                    ("w_in", "lm2_input_gate"),
                    ("w_forget", "lm2_forget_gate"),
                    ("w_gate", "lm2_output_gate"),
                ):
                    lin = getattr(module, attr)
                    self._handles.append(lin.register_forward_hook(self._sigmoid_hook(f"{layer}/{label}")))
        if not self._handles:
            log.warning("MemoryDiagnosticsCallback: the model has no memory layers, nothing to record")

    def pre_step(self, batch: Dict[str, Any]) -> None:
        del batch
        if not self.enabled or not self._handles:
            return
        self._active = self.step % self.interval == 0
        for _, mem in self._memories:
            mem.record_diagnostics = self._active
        if self._active and self.surprise:
            for layer, mem in self._memories:
                if MemoryImpl(mem.impl) in (MemoryImpl.chunked, MemoryImpl.reference):
                    self._swapped.append((mem, mem.rule))
                    mem.rule = mem.rule._replace(
                        optimizer=_SurpriseRecorder(mem.rule.optimizer, self._surprise_sink(layer))
                    )

    def pre_optim_step(self) -> None:
        if not self._active:
            return
        self._restore()
        for key, total in self._sums.items():
            if key.endswith("_max"):
                self.trainer.record_metric(f"memory/{key}", total, ReduceType.max)
            else:
                self.trainer.record_metric(f"memory/{key}", total / self._counts[key], ReduceType.mean)
        for layer, mem in self._memories:
            grads = [p.grad for p in mem.parameters() if p.grad is not None]
            if grads:
                # Already the global norm on every rank (identical values), so ``max`` doesn't
                # inflate it by sqrt(#replicas) as summing squares over ranks would under DDP/HSDP.
                self.trainer.record_metric(f"memory/{layer}/grad_norm", _global_grad_norm(grads), ReduceType.max)
        model = self.trainer.train_module.model  # type: ignore[attr-defined]
        for name, module in model.named_modules():
            if isinstance(module, MirasMemoryParts) and module.context_gate is not None:
                gate = module.context_gate.detach()
                gate = gate.full_tensor() if hasattr(gate, "full_tensor") else gate
                self.trainer.record_metric(
                    f"memory/{_layer_of(name)}/mac_context_gate", gate.float().mean(), ReduceType.mean
                )
        self._sums.clear()
        self._counts.clear()
        self._active = False

    def post_train(self) -> None:
        self.close()

    def on_error(self, exc: BaseException) -> None:
        del exc
        self.close()

    def close(self) -> None:
        self._restore()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._memories.clear()

    # ------------------------------------------------------------------ internals
    def _restore(self) -> None:
        for mem, rule in self._swapped:
            mem.rule = rule
        self._swapped.clear()
        for _, mem in self._memories:
            mem.record_diagnostics = False

    def _add(self, key: str, value: torch.Tensor) -> None:
        """Sum (for the mean) of a metric over the step's calls; the maximum for ``*_max`` keys."""
        value = value.detach().float()
        if key not in self._sums:
            self._sums[key] = value
        elif key.endswith("_max"):
            self._sums[key] = torch.maximum(self._sums[key], value)
        else:
            self._sums[key] = self._sums[key] + value
        self._counts[key] += 1

    def _memory_hook(self, layer: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            del args, output
            diag = getattr(module, "last_diagnostics", None)
            if not self._active or not diag:
                return
            for key, value in diag.items():
                name = "weight_norm" if key == "memory_weight_norm" else key
                self._add(f"{layer}/{name}", value)
            module.last_diagnostics = None  # type: ignore[assignment]

        return hook

    def _sigmoid_hook(self, key: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            del module, args
            if self._active:
                self._add(key, torch.sigmoid(output.detach().float()).mean())

        return hook

    def _surprise_sink(self, layer: str) -> Callable[[torch.Tensor], None]:
        def sink(sq_norm: torch.Tensor) -> None:
            if self._active:
                self._add(f"{layer}/surprise_norm", sq_norm.float().clamp_min(0).sqrt().mean())

        return sink


@dataclass
class MirasWandBCallback(WandBCallback):
    """OLMo-core's ``WandBCallback`` that also runs offline and with a ``wandb login`` session.

    OLMo-core's callback insists on ``WANDB_API_KEY``. Here: with ``mode="offline"`` (or
    ``WANDB_MODE=offline``) nothing needs credentials and the run syncs later with
    ``wandb sync``; online, the key may come from ``WANDB_API_KEY`` or from ``wandb login``.
    Cancel-by-tag checks need the W&B API and only run online.
    """

    mode: Optional[str] = None
    """``"online"``, ``"offline"`` or ``"disabled"``; ``None``: ``WANDB_MODE`` or online."""

    def resolved_mode(self) -> str:
        mode = (self.mode or os.environ.get("WANDB_MODE") or "online").lower()
        if mode == "dryrun":
            mode = "offline"
        if mode not in ("online", "offline", "disabled"):
            raise OLMoConfigurationError(f"unknown W&B mode {mode!r}; valid: online, offline, disabled")
        return mode

    def pre_train(self) -> None:
        if not self.enabled or get_rank() != 0:
            return
        mode = self.resolved_mode()
        if mode == "online" and WANDB_API_KEY_ENV_VAR not in os.environ and not self._logged_in():
            raise OLMoEnvironmentError(
                f"W&B is enabled online but there are no credentials: run 'wandb login', set "
                f"{WANDB_API_KEY_ENV_VAR}, or log offline with WANDB_MODE=offline "
                "(or --trainer.callbacks.wandb.mode=offline)"
            )
        wandb_dir = self.trainer.work_dir / "wandb"
        wandb_dir.mkdir(parents=True, exist_ok=True)
        self.wandb.init(
            dir=wandb_dir,
            project=self.project,
            entity=self.entity,
            group=self.group,
            name=self.name,
            tags=self.tags,
            notes=self.notes,
            config=self.config,
            mode=mode,
        )
        self._run_path = self.run.path if mode == "online" else None  # type: ignore[union-attr]
        log.info("W&B run (%s): %s", mode, getattr(self.run, "dir", wandb_dir))

    def finalize(self, exit_code: int = 0) -> None:
        # OLMo-core passes ``quiet=``, which newer wandb releases no longer accept.
        if not self.finalized:
            log.log(
                logging.WARNING if exit_code > 0 else logging.INFO, "Finalizing W&B run (exit code %d)...", exit_code
            )
            self.wandb.finish(exit_code=exit_code)
            self._finalized = True

    def _logged_in(self) -> bool:
        try:
            return bool(self.wandb.api.api_key)
        except Exception:  # noqa: BLE001 - any failure means "no usable login"
            return False

    def check_if_canceled(self) -> None:
        if self._run_path is None:
            return
        if WANDB_API_KEY_ENV_VAR in os.environ:
            super().check_if_canceled()
            return
        from requests.exceptions import RequestException
        from wandb.errors import CommError  # type: ignore

        try:
            run = self.wandb.Api(timeout=5).run(self._run_path)
            if any(tag.lower() in (self.cancel_tags or []) for tag in run.tags or []):
                self.trainer.cancel_run("canceled from W&B tag")
        except (RequestException, CommError, TimeoutError):
            log.warning("Failed to communicate with W&B API")


@dataclass
class HFPretrainedWeightsCallback(Callback):
    """Loads base weights from a Hugging Face-format OLMo checkpoint when training starts fresh.

    Runs before every other callback's ``pre_train`` (so a pre-train checkpoint already holds the
    pretrained base) and only if the trainer didn't resume from a checkpoint in its save folder.
    Conversion is OLMo-core's (``olmo_core.nn.hf.checkpoint.load_hf_model``); the memory keeps
    its initialisation.
    """

    priority: ClassVar[int] = 100

    path: Optional[str] = None
    revision: str = "main"

    def pre_train(self) -> None:
        if self.path is None or self.trainer.checkpoint_loaded:
            return
        import torch.distributed.checkpoint.state_dict as dist_cp_sd

        from olmo_core.nn.hf.checkpoint import load_hf_model

        model = self.trainer.train_module.model  # type: ignore[attr-defined]
        path = str(self.path)
        self._check_local_path(path)
        log.info("Loading pretrained base weights (Hugging Face format) from '%s'...", path)
        state = dist_cp_sd.get_model_state_dict(model)
        base_keys = {k for k in state if ".miras." not in k}
        base_state = _RecordingStateDict((k, v) for k, v in state.items() if k in base_keys)
        before = dict(base_state)
        try:
            load_hf_model(
                path,
                base_state,
                revision=self.revision,
                num_embeddings=getattr(model, "vocab_size", None),  # OLMo-core pads the vocabulary
                process_group=self.trainer.dp_process_group,
                work_dir=self.trainer.work_dir,
            )
        except NotImplementedError as e:  # OLMo-core: neither a directory nor a reachable hub model id
            raise OLMoConfigurationError(
                f"Hugging Face checkpoint '{path}' is neither an existing local directory (cwd: {os.getcwd()}) "
                "nor a Hugging Face hub model id that could be reached (offline, private or misspelled?); "
                "give a directory holding config.json and the weights, or a valid hub id"
            ) from e
        except AssertionError as e:  # OLMo-core asserts on the files of a local/remote directory
            raise OLMoConfigurationError(
                f"Hugging Face checkpoint '{path}' was rejected by OLMo-core's loader, which needs "
                "generation_config.json, model.safetensors.index.json or pytorch_model.bin in the directory "
                "(a single-file model.safetensors needs generation_config.json next to it: save one with "
                "transformers.GenerationConfig.from_model_config(config).save_pretrained(path))"
            ) from e
        unexpected = sorted(base_state.unexpected)
        missing = sorted(k for k in base_keys if base_state[k] is before[k])
        if unexpected or missing:
            n_model = _num_layers(base_keys)
            n_ckpt = _num_layers(set(base_state.unexpected) | {k for k in base_keys if base_state[k] is not before[k]})
            parts = []
            if missing:
                parts.append(f"lacks {len(missing)} base parameter(s) of the model, e.g. {', '.join(missing[:5])}")
            if unexpected:
                parts.append(
                    f"has {len(unexpected)} parameter(s) the model doesn't, e.g. {', '.join(unexpected[:5])}"
                )
            raise OLMoConfigurationError(
                f"Hugging Face checkpoint '{path}' {' and '.join(parts)} (checkpoint: {n_ckpt} layer(s), "
                f"model: {n_model} layer(s)): is it the same architecture as model.base?"
            )
        dist_cp_sd.set_model_state_dict(
            model, dict(base_state), options=dist_cp_sd.StateDictOptions(strict=False)
        )
        log.info("Loaded %d base tensors from '%s'; memory parameters keep their initialisation", len(base_state), path)

    @staticmethod
    def _check_local_path(path: str) -> None:
        """A path meant as a local directory must exist and hold ``config.json``; hub ids pass."""
        if "://" in path:
            return
        parent = os.path.dirname(path.rstrip("/"))
        looks_local = path.startswith(("/", ".", "~")) or os.path.exists(path) or bool(parent and os.path.isdir(parent))
        if not looks_local:
            return
        local = os.path.expanduser(path)
        if not os.path.isdir(local):
            raise OLMoConfigurationError(
                f"Hugging Face checkpoint '{path}' is not an existing directory (cwd: {os.getcwd()}); "
                "give a directory saved with save_pretrained (config.json and weights) or a hub model id"
            )
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise OLMoConfigurationError(
                f"Hugging Face checkpoint directory '{path}' has no config.json (found: "
                f"{', '.join(sorted(os.listdir(local))[:10]) or 'nothing'}); is it a save_pretrained directory?"
            )


class _RecordingStateDict(dict):
    """A state dict that takes keys it doesn't have (recording them) instead of raising KeyError."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.unexpected: List[str] = []

    def __missing__(self, key: str) -> None:
        self.unexpected.append(key)
        return None


def _num_layers(keys: Any) -> int:
    """Number of transformer blocks named in ``keys`` (``blocks.<i>.`` prefixes)."""
    idx = [int(m.group(1)) for k in keys if (m := _BLOCK_RE.match(k))]
    return max(idx) + 1 if idx else 0
