"""Hugging Face model directories: which Linears are masked, and the loading pieces every loader shares.

``targets`` is the one target-selection rule (training, priors, export and evaluation agree);
``hf_dir`` checks a model directory and maps tensor names to safetensors files; ``lazy`` opens a
model with one decoder block in memory at a time; ``dense`` loads a whole model for evaluation.
"""
