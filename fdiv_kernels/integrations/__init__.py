"""Drop-ins for the trainers fdiv-kernels plugs into: one module per host.

The core package never imports this one, and each module imports its host only when a function
that needs it is called, so ``import fdiv_kernels.integrations.trl`` works without TRL installed:

    fdiv_kernels.integrations.trl        TRL: GKD's generalized_jsd_loss, selective_log_softmax,
                                         log-prob + entropy, apply_fk_to_trl()
    fdiv_kernels.integrations.liger      Liger-Kernel's JSD / KL / TVD / fused-linear JSD modules,
                                         apply_fk_to_liger()
    fdiv_kernels.integrations.torchtune  torchtune's KD losses (forward/reverse/symmetric KL), also
                                         from hidden states
    fdiv_kernels.integrations.hf         logit distillation in a transformers Trainer
"""
