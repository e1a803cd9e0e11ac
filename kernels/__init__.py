"""saetune.kernels: SAE training ops, each fast path beside its plain-torch reference.

``topk_sae``: TopK encoder and sparse decoder as autograd Functions whose backward touches only
the k active latents (and the AuxK latents). The Triton versions will plug in beside them.
"""
