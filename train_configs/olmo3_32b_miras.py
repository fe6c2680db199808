"""olmo3_32b_miras: Titans MAG memory on a pretrained OLMo 3 32B, base frozen, trained on Dolma 3
longmino (OLMo 3's long-context mix) with 64K-token instances read as 2K segments.

    torchrun --nnodes=8 --nproc-per-node=8 ... scripts/train.py olmo3_32b_miras \\
        --pretrained.path=<OLMo-core checkpoint of OLMo 3 32B> \\
        --trainer.save_folder=<shared dir or gs://...> --dataset.mix_base_dir=<data root>
    python scripts/train.py olmo3_32b_miras --dry-run          # validate; needs no GPU/weights/data

Why these numbers: attention keeps OLMo 3's 4K sliding window (3 of 4 layers) and its full-attention
layers carry at most 4K keys across segments (``max_kv_context``), so relative distances stay
within the 8K context OLMo 3 was pretrained on (no RoPE rescaling); everything beyond reaches a
token only through the memory, which carries its state across the 32 segments of an instance.
Segments are 2K, not 4K: gradients flow back through one segment (``bptt_segments=1``), and the
memory's outer gradients explode past ~2K tokens of backprop (docs/memory.md, "Inner step size
and backprop span").
Memory sits on every 8th layer, all sliding-window ones (1, 9, 17, ...). Backprop is cut after
every segment to bound activation memory. FSDP shards over all ranks; on many nodes HSDP may be
faster (``--train_module.dp_config.name=hsdp --train_module.dp_config.shard_degree=64``). Train
everything with ``--model.freeze_base=false`` (then ``train_module.optim.lr`` is the base LR).
"""

from typing import List

from olmo_core.data import TokenizerConfig

from olmo_miras_plugin.models import MirasMemoryConfig, olmo3_32B_miras
from olmo_miras_plugin.train import MirasExperimentConfig
from olmo_miras_plugin.train.recipes import frozen_base_memory_experiment

RUN_NAME = "olmo3_32b_miras"
SEQUENCE_LENGTH = 65_536  # tokens per instance
SEGMENT_LENGTH = 2_048  # tokens per forward call (and of backprop); memory state carried between them
MAX_KV_CONTEXT = 4_096  # keys a full-attention layer carries across segments
GLOBAL_BATCH_SIZE = 64 * SEQUENCE_LENGTH  # ~4M tokens per step
MAX_TOKENS = 5_000_000_000


def build_experiment(overrides: List[str]) -> MirasExperimentConfig:
    del overrides  # applied on top by the loader
    tokenizer = TokenizerConfig.dolma2()
    model = olmo3_32B_miras(
        vocab_size=tokenizer.padded_vocab_size(),
        memory=MirasMemoryConfig(block_type="mag", preset="titans", every=8, offset=1, chunk_size=64),
        freeze_base=True,
        max_kv_context=MAX_KV_CONTEXT,
    )
    return frozen_base_memory_experiment(
        RUN_NAME,
        model,
        tokenizer=tokenizer,
        sequence_length=SEQUENCE_LENGTH,
        segment_length=SEGMENT_LENGTH,
        global_batch_size=GLOBAL_BATCH_SIZE,
        max_tokens=MAX_TOKENS,
        base_lr=1e-5,
        memory_lr=2e-4,
        bptt_segments=1,
        save_interval=250,
        ephemeral_save_interval=50,
    )
