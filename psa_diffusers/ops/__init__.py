"""The ops of pyramid sparse attention, one folder each.

Every op folder holds ``reference.py`` (the plain PyTorch math, obviously right), ``kernel.py``
(the Triton kernel, its launcher and a typed ``*_triton`` function) and, in ``__init__``, the one
public function that chooses between them (``backend="auto" | "reference" | "triton"``):

* ``pooling``    -- mean pooling of K and V at factors 2, 4, 8 (``pool_pyramid``);
* ``importance`` -- the sampled block mass (``estimate_block_importance``);
* ``levels``     -- the quota and mass rules, forced text levels, compaction (``choose_levels``,
  ``compact_levels``);
* ``caps``       -- key smoothness and the similarity cap (``similarity_caps``);
* ``attention``  -- the sparse pyramid attention itself (``sparse_attention``).

``triton_support`` guards the Triton import and says where the kernels can run;
``kernel_configs`` is the table of tile sizes every launcher reads.
"""
