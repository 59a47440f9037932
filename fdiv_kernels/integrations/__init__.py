"""Drop-ins for the trainers fdiv-kernels plugs into: one module per host.

The core package never imports this one, and each module imports its host only when a function
that needs it is called, so ``import fdiv_kernels.integrations.trl`` works without TRL installed:

    fdiv_kernels.integrations.trl        TRL: GKD's / GOLD's generalized_jsd_loss and GKD's
                                         loss from hidden states, SDPO's / SDFT's top-k loss,
                                         the server distillation's top-k forward KL, the async
                                         distillation's chunked sparse JSD, the
                                         DistillationTrainer's loss from hidden states,
                                         selective_log_softmax, log-prob + entropy, the fused LM
                                         head's kernel, apply_fk_to_trl()
    fdiv_kernels.integrations.liger      Liger-Kernel's JSD / KL / TVD / fused-linear JSD modules,
                                         apply_fk_to_liger()
    fdiv_kernels.integrations.torchtune  torchtune's KD losses (forward/reverse/symmetric KL), also
                                         from hidden states
    fdiv_kernels.integrations.axolotl    axolotl's KD plugin: its top-k forward KL,
                                         apply_fk_to_axolotl()
    fdiv_kernels.integrations.verl       verl's FSDP top-k forward KL, apply_fk_to_verl()
    fdiv_kernels.integrations.hf         distillation in a transformers Trainer: from a teacher
                                         model, or from a dataset's top-k teacher log-probs

Each host's swap, what it is tested for and the host conventions relied on: docs/hosts/*.md.
"""
