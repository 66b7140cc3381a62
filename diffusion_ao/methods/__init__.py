"""The quantization methods, each run by the recipe (`diffusion_ao.recipe`) when its config is set:

    dmq/               DMQ: learned equivalent scaling, power-of-two scaling, adaptive timestep weights
    qdiff/             Q-Diffusion: block reconstruction (the shortcut split is a pass)
    tfmq/              TFMQ-DM: the temporal feature cache, finite-set calibration, TIAR
    gptq.py            GPTQ rounding of the weights
    low_rank.py        a low-rank branch beside each low-bit linear
    mixed_precision.py bit widths per layer within a size budget
    output_correction.py per-timestep output correction of the converted model
    time_groups.py     activation ranges per group of timesteps
    qat.py             a QAT fine-tune of the quantization parameters
    learning.py        what the learned methods share (learnable quantizers, losses, timestep weights)
"""
