"""tiny_miras: the embedded default. Trains a ~0.8M-parameter OLMo3-style byte-level model with a
Titans MAG memory layer on the Python stdlib's source, offline, on a 2-core CPU in a few minutes.

    python scripts/train.py tiny_miras                       # ~200 steps, checkpoint in runs/tiny_miras
    python scripts/train.py tiny_miras --dry-run
    WANDB_MODE=offline python scripts/train.py tiny_miras --trainer.callbacks.wandb.enabled=true
    torchrun --nproc-per-node=2 scripts/train.py tiny_miras --train_module.dp_config='{name: fsdp}' \
        --train_module.rank_microbatch_size=2048      # each rank takes half of the 8 instances

Run again with the same save folder and it resumes from the latest checkpoint (OLMo-core's
trainer); ``--trainer.save_folder=runs/other`` starts a fresh run.

Each 512-byte instance is read as 4 segments of 128 with the memory state carried across them
(segment-stateful training), while attention sees a 64-token window (3 of 4 layers) or at most 128
carried keys (the full-attention layer, ``max_kv_context``), so beyond that only the memory links a
segment to the ones before it.
"""

from typing import List

from olmo_core.data import NumpyDataLoaderConfig
from olmo_core.optim import AdamWConfig, CosWithWarmup, OptimGroupOverride
from olmo_core.train import Duration, TrainerConfig
from olmo_core.train.callbacks import (
    CheckpointerCallback,
    ConfigSaverCallback,
    ConsoleLoggerCallback,
    SpeedMonitorCallback,
)

from olmo_miras_plugin.models import MirasMemoryConfig, tiny_miras
from olmo_miras_plugin.train import (
    MemoryDiagnosticsCallback,
    MirasExperimentConfig,
    MirasTrainModuleConfig,
    MirasWandBCallback,
    StdlibFSLDatasetConfig,
)

RUN_NAME = "tiny_miras"
SEQUENCE_LENGTH = 512
SEGMENT_LENGTH = 128
INSTANCES_PER_STEP = 8
STEPS = 200


def build_experiment(overrides: List[str]) -> MirasExperimentConfig:
    del overrides  # applied on top by the loader
    model = tiny_miras(
        d_model=128,
        n_layers=4,
        n_heads=4,
        window=64,
        memory=MirasMemoryConfig(block_type="mag", layers=[1], preset="titans", chunk_size=32),
        max_kv_context=SEGMENT_LENGTH,
    )
    dataset = StdlibFSLDatasetConfig(
        sequence_length=SEQUENCE_LENGTH,
        data_dir="runs/data/stdlib",
        work_dir="runs/data/stdlib-cache",
    )
    train_module = MirasTrainModuleConfig(
        rank_microbatch_size=INSTANCES_PER_STEP * SEQUENCE_LENGTH,
        max_sequence_length=SEQUENCE_LENGTH,
        optim=AdamWConfig(
            lr=3e-3,
            weight_decay=0.1,
            betas=(0.9, 0.95),
            group_overrides=[OptimGroupOverride(params=["embeddings.weight"], opts=dict(weight_decay=0.0))],
        ),
        memory_lr=3e-3,
        gate_lr=3e-3,
        gate_weight_decay=0.0,
        scheduler=CosWithWarmup(warmup=20, alpha_f=0.1),
        max_grad_norm=1.0,
        segment_length=SEGMENT_LENGTH,
        bptt_segments=2,
    )
    console = ConsoleLoggerCallback(log_interval=10, metrics_log_interval=10)
    console.metrics += ["memory/*"]
    trainer = TrainerConfig(
        save_folder=f"runs/{RUN_NAME}",
        metrics_collect_interval=10,
        cancel_check_interval=50,
        max_duration=Duration.steps(STEPS),
        callbacks={
            "console_logger": console,
            "checkpointer": CheckpointerCallback(save_interval=100, ephemeral_save_interval=None, save_async=False),
            "config_saver": ConfigSaverCallback(),
            "speed_monitor": SpeedMonitorCallback(),
            "memory_diagnostics": MemoryDiagnosticsCallback(interval=10),
            "wandb": MirasWandBCallback(enabled=False, name=RUN_NAME, project="olmo-miras"),
        },
    )
    return MirasExperimentConfig(
        run_name=RUN_NAME,
        model=model,
        dataset=dataset,
        data_loader=NumpyDataLoaderConfig(
            global_batch_size=INSTANCES_PER_STEP * SEQUENCE_LENGTH, seed=34521, num_workers=0
        ),
        train_module=train_module,
        trainer=trainer,
        init_seed=12536,
    )
