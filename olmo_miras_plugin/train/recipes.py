"""Building blocks the pretrained-OLMo experiment files share (data, parallelism, callbacks).

Kept here so ``train_configs/olmo*_miras.py`` differ only where the experiments differ; every
piece is a plain OLMo-core config object that the CLI overrides can still change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict

from olmo_core.config import DType
from olmo_core.data import (
    DataMix,
    InstanceFilterConfig,
    NumpyPackedFSLDatasetConfig,
    TokenizerConfig,
)
from olmo_core.distributed.parallel import DataParallelType
from olmo_core.nn.transformer import TransformerActivationCheckpointingMode, TransformerDataParallelWrappingStrategy
from olmo_core.train.callbacks import (
    Callback,
    CheckpointerCallback,
    ConfigSaverCallback,
    ConsoleLoggerCallback,
    GPUMemoryMonitorCallback,
    ProfilerCallback,
    SpeedMonitorCallback,
)
from olmo_core.train.train_module import (
    TransformerActivationCheckpointingConfig,
    TransformerDataParallelConfig,
)

from .callbacks import MemoryDiagnosticsCallback, MirasWandBCallback

if TYPE_CHECKING:
    from ..models import MirasModelConfig
    from .experiment import MirasExperimentConfig

__all__ = [
    "DEFAULT_MIX_BASE_DIR",
    "frozen_base_memory_experiment",
    "full_activation_checkpointing",
    "fsdp_bf16",
    "longmino_dataset",
    "pretrained_run_callbacks",
]

DEFAULT_MIX_BASE_DIR = "https://olmo-data.org"
"""Public root of OLMo-core's data mixes (slow); on Ai2 clusters use e.g. ``/weka/oe-training-default/ai2-llm``
or ``gs://ai2-llm`` via ``--dataset.mix_base_dir=...``."""


def longmino_dataset(
    sequence_length: int,
    *,
    tokenizer: TokenizerConfig,
    mix_base_dir: str = DEFAULT_MIX_BASE_DIR,
    work_dir: str = "runs/dataset-cache",
) -> NumpyPackedFSLDatasetConfig:
    """Dolma 3 "longmino" (OLMo 3's long-context extension mix), packed into long instances the
    way OLMo-core's OLMo 3 long-context scripts pack it, except without intra-document masking:
    memory blocks refuse it (their state would cross documents anyway; EOS/BOS mark the seams)."""
    return NumpyPackedFSLDatasetConfig.from_data_mix(
        DataMix.OLMo_longmino_mix_0925,
        tokenizer=tokenizer,
        mix_base_dir=mix_base_dir,
        work_dir=work_dir,
        sequence_length=sequence_length,
        generate_doc_lengths=False,
        source_group_size=8,
        source_permutation_seed=123,
        instance_filter_config=InstanceFilterConfig(
            repetition_max_period=13, repetition_min_period=1, repetition_max_count=32
        ),
    )


def fsdp_bf16() -> TransformerDataParallelConfig:
    """FSDP2 with bf16 parameters and fp32 gradient reduction, one unit per block (OLMo's default)."""
    return TransformerDataParallelConfig(
        name=DataParallelType.fsdp,
        param_dtype=DType.bfloat16,
        reduce_dtype=DType.float32,
        wrapping_strategy=TransformerDataParallelWrappingStrategy.blocks,
    )


def full_activation_checkpointing() -> TransformerActivationCheckpointingConfig:
    """Recompute every block in backward (``budget`` mode would need ``torch.compile``)."""
    return TransformerActivationCheckpointingConfig(mode=TransformerActivationCheckpointingMode.full)


def pretrained_run_callbacks(
    run_name: str,
    *,
    save_interval: int,
    ephemeral_save_interval: int,
    metrics_interval: int = 10,
    wandb_project: str = "olmo-miras",
) -> Dict[str, Callback]:
    """Checkpointing (permanent + ephemeral, async), W&B, memory diagnostics, console, speed and
    GPU-memory monitors, config saving. No pre-train checkpoint: step 0 is the pretrained model."""
    console = ConsoleLoggerCallback(log_interval=1, metrics_log_interval=metrics_interval)
    console.metrics += ["memory/*"]
    return {
        "checkpointer": CheckpointerCallback(
            save_interval=save_interval,
            ephemeral_save_interval=ephemeral_save_interval,
            pre_train_checkpoint=False,
            save_async=True,
        ),
        "config_saver": ConfigSaverCallback(),
        "console_logger": console,
        "speed_monitor": SpeedMonitorCallback(),
        "gpu_monitor": GPUMemoryMonitorCallback(),
        "memory_diagnostics": MemoryDiagnosticsCallback(interval=metrics_interval),
        "profiler": ProfilerCallback(enabled=False),
        "wandb": MirasWandBCallback(enabled=True, name=run_name, project=wandb_project, cancel_check_interval=10),
    }


def frozen_base_memory_experiment(
    run_name: str,
    model: "MirasModelConfig",
    *,
    tokenizer: TokenizerConfig,
    sequence_length: int,
    segment_length: int,
    global_batch_size: int,
    max_tokens: int,
    base_lr: float,
    memory_lr: float,
    bptt_segments: int,
    save_interval: int,
    ephemeral_save_interval: int,
) -> "MirasExperimentConfig":
    """A pretrained OLMo with memory, trained on longmino with the base frozen: the experiment the
    1B / 7B / 32B files share. Instances of ``sequence_length`` tokens are read as segments of
    ``segment_length`` with the memory state carried; FSDP (bf16 params, fp32 reduce), full
    activation checkpointing, AdamW with warmup then linear decay, z-loss, grad clipping; memory
    weights and gates get their own LR (``memory_lr``; gates without weight decay).
    ``base_lr`` only matters with ``--model.freeze_base=false``."""
    from olmo_core.data import NumpyDataLoaderConfig
    from olmo_core.optim import AdamWConfig, LinearWithWarmup, OptimGroupOverride
    from olmo_core.train import Duration, TrainerConfig

    from .experiment import MirasExperimentConfig, PretrainedConfig
    from .train_module import MirasTrainModuleConfig

    train_module = MirasTrainModuleConfig(
        rank_microbatch_size=sequence_length,  # one instance per rank per micro-batch
        max_sequence_length=sequence_length,
        optim=AdamWConfig(
            lr=base_lr,
            weight_decay=0.1,
            betas=(0.9, 0.95),
            group_overrides=[OptimGroupOverride(params=["embeddings.weight"], opts=dict(weight_decay=0.0))],
        ),
        memory_lr=memory_lr,
        memory_weight_decay=0.1,
        gate_lr=memory_lr,
        gate_weight_decay=0.0,
        scheduler=LinearWithWarmup(warmup=100, alpha_f=0.1),
        max_grad_norm=1.0,
        z_loss_multiplier=1e-5,
        dp_config=fsdp_bf16(),
        ac_config=full_activation_checkpointing(),
        compile_model=False,  # the memory scan's Python loops don't compile cleanly yet
        segment_length=segment_length,
        bptt_segments=bptt_segments,
    )
    trainer = TrainerConfig(
        save_folder=f"runs/{run_name}",
        metrics_collect_interval=10,
        cancel_check_interval=10,
        max_duration=Duration.tokens(max_tokens),
        callbacks=pretrained_run_callbacks(
            run_name, save_interval=save_interval, ephemeral_save_interval=ephemeral_save_interval
        ),
    )
    return MirasExperimentConfig(
        run_name=run_name,
        model=model,
        dataset=longmino_dataset(sequence_length, tokenizer=tokenizer),
        data_loader=NumpyDataLoaderConfig(global_batch_size=global_batch_size, seed=4123, num_workers=8),
        train_module=train_module,
        trainer=trainer,
        pretrained=PretrainedConfig(required=True),
    )
