"""Pure mask math (no torch.distributed, no deepspeed): N:M layout, sampling, the MaskPro estimator.

``nm`` owns the N:M layout, validation and bit packing; ``sampling`` the counter-based RNG and
exact mask draws; ``policy`` the set probability, its score and the logit update;
``advantages`` the residual tracker and advantage conditioning.
"""
