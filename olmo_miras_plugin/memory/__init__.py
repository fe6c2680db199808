"""Titans/MIRAS neural long-term memory: the memory math, independent of OLMo-core's model wiring.

- ``architecture.py``  the memory network (linear / MLP / residual+norm) and its explicit backprop
- ``objective.py``     attentional bias ℓ(M; k, v): l2, lp, huber, dot
- ``retention.py``     accumulator → weights: decay, ℓq, KL (softmax)
- ``optimizer.py``     gradient descent with/without momentum, per token and chunk closed form
- ``scan.py``          the reference loop and the chunk-parallel scan
- ``triton_scan.py``   ``impl="triton"``: whole chunks to a kernel, the rest to ``scan.py``
- ``triton_linear.py`` Triton kernels of the linear memory (forward and backward)
- ``triton_mlp_split.py`` Triton kernels of the depth-2 MLP memory (hidden units split over programs)
- ``triton_mlp.py``    Triton kernels of the depth-2 MLP memory, one program per head (``OLMO_MIRAS_TRITON_SPLIT=0``)
- ``cuda_graphs.py``   ``impl="graphed"`` / ``"triton_graphed"``: CUDA-graph capture of a scan
- ``conv.py``          the short causal conv on q, k, v
- ``fusion.py``        conv, q/k/v layout and norm, gates / read-out norm: compiled around the scan on CUDA
- ``triton_prepare.py`` Triton kernels of fusion's input preparation (the default on CUDA)
- ``layer.py``         the layer: projections, short conv, gates, read-out norm, output projection
- ``config.py``        ``NeuralMemoryConfig`` and the presets titans / moneta / yaad / memora
"""

from .architecture import ActivationName, MemoryArchitectureConfig
from .config import PRESETS, MemoryImpl, NeuralMemoryConfig
from .layer import NeuralMemory
from .objective import AttentionalBiasConfig, ObjectiveName
from .optimizer import MemoryOptimizerConfig, MemoryOptimizerName
from .retention import RetentionConfig, RetentionName
from .state import MemoryState

__all__ = [
    "ActivationName",
    "AttentionalBiasConfig",
    "MemoryArchitectureConfig",
    "MemoryImpl",
    "MemoryOptimizerConfig",
    "MemoryOptimizerName",
    "MemoryState",
    "NeuralMemory",
    "NeuralMemoryConfig",
    "ObjectiveName",
    "PRESETS",
    "RetentionConfig",
    "RetentionName",
]
