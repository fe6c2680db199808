"""olmo2_1b_miras: Titans MAG memory on a pretrained OLMo 2 1B, base frozen, trained on Dolma 3
longmino (OLMo 3's long-context mix) with 32K-token instances read as 2K segments.

    torchrun --nproc-per-node=8 scripts/train.py olmo2_1b_miras \\
        --pretrained.path=<OLMo-core checkpoint of OLMo-2-0425-1B> \\
        --trainer.save_folder=<shared dir or gs://...> --dataset.mix_base_dir=<data root>
    python scripts/train.py olmo2_1b_miras --dry-run          # validate; needs no GPU/weights/data

The base is OLMo-core's ``olmo2_1B_v2`` layout (16 layers, d_model 2048): the released
OLMo-2-0425-1B checkpoint (OLMo-core's ``olmo2_1B`` preset has 18 layers and no released weights).
OLMo 2 attends over its whole context (no sliding window) and was pretrained at 4K: segments of
2K with at most 2K carried keys (``max_kv_context``) keep every relative distance within 4K, so
everything older reaches a token only through the memory, carried across 16 segments per instance.
Memory on layers 1, 5, 9, 13. From Hugging Face weights: ``--pretrained.path=allenai/OLMo-2-0425-1B
--pretrained.format=hf``. Train everything with ``--model.freeze_base=false``.
"""

from typing import List

from olmo_core.data import NumpyDataLoaderConfig, TokenizerConfig
from olmo_core.optim import AdamWConfig, LinearWithWarmup, OptimGroupOverride
from olmo_core.train import Duration, TrainerConfig

from olmo_miras_plugin.models import MirasMemoryConfig, miras_from_preset
from olmo_miras_plugin.train import MirasExperimentConfig, MirasTrainModuleConfig, PretrainedConfig
from olmo_miras_plugin.train.recipes import (
    fsdp_bf16,
    full_activation_checkpointing,
    longmino_dataset,
    pretrained_run_callbacks,
)

RUN_NAME = "olmo2_1b_miras"
SEQUENCE_LENGTH = 32_768  # tokens per instance
SEGMENT_LENGTH = 2_048  # tokens per forward call; memory state carried between them
GLOBAL_BATCH_SIZE = 64 * SEQUENCE_LENGTH  # ~2M tokens per step
MAX_TOKENS = 2_000_000_000


def build_experiment(overrides: List[str]) -> MirasExperimentConfig:
    del overrides  # applied on top by the loader
    tokenizer = TokenizerConfig.dolma2()
    model = miras_from_preset(
        "olmo2_1B_v2",
        tokenizer.padded_vocab_size(),
        memory=MirasMemoryConfig(block_type="mag", preset="titans", every=4, offset=1, chunk_size=64),
        freeze_base=True,
        max_kv_context=SEGMENT_LENGTH,
    )
    train_module = MirasTrainModuleConfig(
        rank_microbatch_size=SEQUENCE_LENGTH,  # one instance per rank per micro-batch
        max_sequence_length=SEQUENCE_LENGTH,
        optim=AdamWConfig(
            lr=4e-5,  # the base's LR, only used with --model.freeze_base=false
            weight_decay=0.1,
            betas=(0.9, 0.95),
            group_overrides=[OptimGroupOverride(params=["embeddings.weight"], opts=dict(weight_decay=0.0))],
        ),
        memory_lr=1e-3,
        memory_weight_decay=0.1,
        gate_lr=1e-3,
        gate_weight_decay=0.0,
        scheduler=LinearWithWarmup(warmup=100, alpha_f=0.1),
        max_grad_norm=1.0,
        z_loss_multiplier=1e-5,
        dp_config=fsdp_bf16(),
        ac_config=full_activation_checkpointing(),
        compile_model=False,  # the memory scan's Python loops don't compile cleanly yet
        segment_length=SEGMENT_LENGTH,
        bptt_segments=4,
    )
    trainer = TrainerConfig(
        save_folder=f"runs/{RUN_NAME}",
        metrics_collect_interval=10,
        cancel_check_interval=10,
        max_duration=Duration.tokens(MAX_TOKENS),
        callbacks=pretrained_run_callbacks(RUN_NAME, save_interval=500, ephemeral_save_interval=100),
    )
    return MirasExperimentConfig(
        run_name=RUN_NAME,
        model=model,
        dataset=longmino_dataset(SEQUENCE_LENGTH, tokenizer=tokenizer),
        data_loader=NumpyDataLoaderConfig(global_batch_size=GLOBAL_BATCH_SIZE, seed=4123, num_workers=8),
        train_module=train_module,
        trainer=trainer,
        pretrained=PretrainedConfig(required=True),
    )
