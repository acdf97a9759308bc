"""Triton kernels of sgattn, one module per kernel family: ``attention``
(global/window attention with importance, and their backward), ``importance``
(fixed-order reduction of importance partials, fused hybrid-scale map) and
``reallocation`` (token reallocation forward/backward). ``ops`` registers
them as ``torch.library`` custom ops; ``sgattn.backends.triton`` uses those."""
