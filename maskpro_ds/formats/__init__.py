"""Every on-disk format maskpro_ds reads or writes, and how it writes them (temp path, then rename).

``atomic`` (temp-then-rename), ``hashing`` (the file hasher, the base fingerprint), ``dtypes`` (the
one dtype table), ``safetensors_io`` (streaming safetensors reads and planned writes),
``mask_artifact`` and ``checkpoint_format``. Nothing here knows about training or DeepSpeed.
"""
