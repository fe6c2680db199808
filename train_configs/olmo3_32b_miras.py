"""olmo3_32b_miras: Titans MAG memory on a pretrained OLMo 3 32B, base frozen, trained on Dolma 3
longmino (OLMo 3's long-context mix) with 64K-token instances read as 4K segments.

    torchrun --nnodes=8 --nproc-per-node=8 ... scripts/train.py olmo3_32b_miras \\
        --pretrained.path=<OLMo-core checkpoint of OLMo 3 32B> \\
        --trainer.save_folder=<shared dir or gs://...> --dataset.mix_base_dir=<data root>
    python scripts/train.py olmo3_32b_miras --dry-run          # validate; needs no GPU/weights/data

Why these numbers: attention keeps OLMo 3's 4K sliding window (3 of 4 layers) and its full-attention
layers carry at most 4K keys across segments (``max_kv_context``), so relative distances stay
within the 8K context OLMo 3 was pretrained on (no RoPE rescaling); everything beyond reaches a
token only through the memory, which carries its state across the 16 segments of an instance.
Memory sits on every 8th layer, all sliding-window ones (1, 9, 17, ...). Backprop is cut after
every segment to bound activation memory. FSDP shards over all ranks; on many nodes HSDP may be
faster (``--train_module.dp_config.name=hsdp --train_module.dp_config.shard_degree=64``). Train
everything with ``--model.freeze_base=false`` (then ``train_module.optim.lr`` is the base LR).
"""

from typing import List

from olmo_core.data import NumpyDataLoaderConfig, TokenizerConfig
from olmo_core.optim import AdamWConfig, LinearWithWarmup, OptimGroupOverride
from olmo_core.train import Duration, TrainerConfig

from olmo_miras_plugin.models import MirasMemoryConfig, olmo3_32B_miras
from olmo_miras_plugin.train import MirasExperimentConfig, MirasTrainModuleConfig, PretrainedConfig
from olmo_miras_plugin.train.recipes import (
    fsdp_bf16,
    full_activation_checkpointing,
    longmino_dataset,
    pretrained_run_callbacks,
)

RUN_NAME = "olmo3_32b_miras"
SEQUENCE_LENGTH = 65_536  # tokens per instance
SEGMENT_LENGTH = 4_096  # tokens per forward call; memory state carried between them
GLOBAL_BATCH_SIZE = 64 * SEQUENCE_LENGTH  # ~4M tokens per step
MAX_TOKENS = 5_000_000_000


def build_experiment(overrides: List[str]) -> MirasExperimentConfig:
    del overrides  # applied on top by the loader
    tokenizer = TokenizerConfig.dolma2()
    model = olmo3_32B_miras(
        vocab_size=tokenizer.padded_vocab_size(),
        memory=MirasMemoryConfig(block_type="mag", preset="titans", every=8, offset=1, chunk_size=64),
        freeze_base=True,
        max_kv_context=SEGMENT_LENGTH,
    )
    train_module = MirasTrainModuleConfig(
        rank_microbatch_size=SEQUENCE_LENGTH,  # one instance per rank per micro-batch
        max_sequence_length=SEQUENCE_LENGTH,
        optim=AdamWConfig(
            lr=1e-5,  # the base's LR, only used with --model.freeze_base=false
            weight_decay=0.1,
            betas=(0.9, 0.95),
            group_overrides=[OptimGroupOverride(params=["embeddings.weight"], opts=dict(weight_decay=0.0))],
        ),
        memory_lr=2e-4,
        memory_weight_decay=0.1,
        gate_lr=2e-4,
        gate_weight_decay=0.0,
        scheduler=LinearWithWarmup(warmup=100, alpha_f=0.1),
        max_grad_norm=1.0,
        z_loss_multiplier=1e-5,
        dp_config=fsdp_bf16(),
        ac_config=full_activation_checkpointing(),
        compile_model=False,  # the memory scan's Python loops don't compile cleanly yet
        segment_length=SEGMENT_LENGTH,
        bptt_segments=1,
    )
    trainer = TrainerConfig(
        save_folder=f"runs/{RUN_NAME}",
        metrics_collect_interval=10,
        cancel_check_interval=10,
        max_duration=Duration.tokens(MAX_TOKENS),
        callbacks=pretrained_run_callbacks(RUN_NAME, save_interval=250, ephemeral_save_interval=50),
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
