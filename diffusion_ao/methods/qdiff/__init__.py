"""Q-Diffusion (docs/methods.md#q-diffusion): block reconstruction with AdaRound weight rounding and LSQ activation step
sizes, on a calibrated PT2E graph (`prepare_pt2e` or `prepare_qat_pt2e`: the learning happens in the
FakeQuantize modules of the QAT path either way). Shortcut splitting is a graph pass: `diffusion_ao.passes.split_concat`.

Example:
    >>> prepared = prepare_pt2e(graph, DiffusionQuantizer(QuantConfig.preset("qdiff-w4a8")))
    >>> calibrate(prepared, data)
    >>> reconstruct_blocks(prepared, data, ReconstructionConfig(iterations=200))
    >>> quantized = convert_pt2e(prepared)
"""
from diffusion_ao.methods.qdiff.blocks import Block, block_from_nodes, find_blocks
from diffusion_ao.methods.qdiff.reconstruction import (
                                                       BlockResult,
                                                       ReconstructionGraph,
                                                       ReconstructionReport,
                                                       reconstruct_blocks,
                                                       select_samples,
)
from diffusion_ao.observers.adaround import AdaRoundWeightQuantizer, annealed_beta, rectified_sigmoid, round_regularizer
from diffusion_ao.observers.lsq import LSQActivationQuantizer

__all__ = ["AdaRoundWeightQuantizer", "Block", "BlockResult", "LSQActivationQuantizer", "ReconstructionGraph",
           "ReconstructionReport", "annealed_beta", "block_from_nodes", "find_blocks", "rectified_sigmoid",
           "reconstruct_blocks", "round_regularizer", "select_samples"]
