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

from olmo_core.data import TokenizerConfig

from olmo_miras_plugin.models import MirasMemoryConfig, miras_from_preset
from olmo_miras_plugin.train import MirasExperimentConfig
from olmo_miras_plugin.train.recipes import frozen_base_memory_experiment

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
    return frozen_base_memory_experiment(
        RUN_NAME,
        model,
        tokenizer=tokenizer,
        sequence_length=SEQUENCE_LENGTH,
        segment_length=SEGMENT_LENGTH,
        global_batch_size=GLOBAL_BATCH_SIZE,
        max_tokens=MAX_TOKENS,
        base_lr=4e-5,
        memory_lr=1e-3,
        # Backprop through one 2,048-token segment: the memory's outer gradients explode past ~2K
        # tokens of backprop (docs/memory.md, "Inner step size and backprop span").
        bptt_segments=1,
        save_interval=500,
        ephemeral_save_interval=100,
    )
