"""SG-Former S/M/B models and checkpoint loading."""
from .sgformer import SGFormer, load_checkpoint, sgformer_b, sgformer_m, sgformer_s

__all__ = ["SGFormer", "load_checkpoint", "sgformer_s", "sgformer_m", "sgformer_b"]
