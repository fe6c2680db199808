"""olmo3_7b_miras: Titans MAG memory on a pretrained OLMo 3 7B, base frozen, trained on Dolma 3
longmino (OLMo 3's long-context mix) with 64K-token instances read as 2K segments.

    torchrun --nproc-per-node=8 scripts/train.py olmo3_7b_miras \\
        --pretrained.path=<OLMo-core checkpoint dir of OLMo 3 7B> \\
        --trainer.save_folder=<shared dir or gs://...> --dataset.mix_base_dir=<data root>
    python scripts/train.py olmo3_7b_miras --dry-run          # validate; needs no GPU/weights/data

Why these numbers: attention keeps OLMo 3's 4K sliding window (3 of 4 layers) and its full-attention
layers carry at most 4K keys across segments (``max_kv_context``), so relative distances stay
within the 8K context OLMo 3 was pretrained on (no RoPE rescaling); everything beyond reaches a
token only through the memory, which carries its state across the 32 segments of an instance.
Segments are 2K, not 4K: gradients flow back through one segment (``bptt_segments=1``), and the
memory's outer gradients explode past ~2K tokens of backprop (docs/memory.md, "Inner step size
and backprop span").
Memory sits on sliding-window layers (1, 5, 9, ...). A Hugging Face checkpoint works too:
``--pretrained.path=allenai/Olmo-3-1025-7B --pretrained.format=hf``. Train everything with
``--model.freeze_base=false`` (then ``train_module.optim.lr`` is the base LR).
"""

from typing import List

from olmo_core.data import TokenizerConfig

from olmo_miras_plugin.models import MirasMemoryConfig, olmo3_7B_miras
from olmo_miras_plugin.train import MirasExperimentConfig
from olmo_miras_plugin.train.recipes import frozen_base_memory_experiment

RUN_NAME = "olmo3_7b_miras"
SEQUENCE_LENGTH = 65_536  # tokens per instance
SEGMENT_LENGTH = 2_048  # tokens per forward call (and of backprop); memory state carried between them
MAX_KV_CONTEXT = 4_096  # keys a full-attention layer carries across segments
GLOBAL_BATCH_SIZE = 32 * SEQUENCE_LENGTH  # ~2M tokens per step
MAX_TOKENS = 5_000_000_000


def build_experiment(overrides: List[str]) -> MirasExperimentConfig:
    del overrides  # applied on top by the loader
    tokenizer = TokenizerConfig.dolma2()
    model = olmo3_7B_miras(
        vocab_size=tokenizer.padded_vocab_size(),
        memory=MirasMemoryConfig(block_type="mag", preset="titans", every=4, offset=1, chunk_size=64),
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
        base_lr=2e-5,
        memory_lr=4e-4,
        bptt_segments=1,
        save_interval=500,
        ephemeral_save_interval=100,
    )
