"""Triton kernels of sgattn, kernels apart from their plans and launchers:
``attention_kernels`` (global/window attention with importance, and their
backward), ``importance_kernels`` (fixed-order reduction of importance
partials, fused hybrid-scale map), ``reallocation_kernels`` (token
reallocation forward/backward); ``plans`` (tile sizes, blocks and the limits
they imply), ``launch`` (launch specs and launchers, tensors in and out).
``ops`` registers the launchers as ``torch.library`` custom ops;
``sgattn.backends.triton`` uses those; ``compile_check`` compiles every
launch spec for sm_80/sm_90 without a GPU."""
