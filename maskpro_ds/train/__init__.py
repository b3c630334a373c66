"""The training runtime: process group, ZeRO-3 model, sharded logit store, estimators, the loop, checkpoints.

Everything that runs inside a (possibly multi-rank) training job lives here; ``trainer.Trainer`` ties
it together. Pure math stays in :mod:`maskpro_ds.masks`, on-disk layouts in :mod:`maskpro_ds.formats`.
"""
