"""SG-Former S/M/B models, checkpoint loading, and timm registration.

``sgformer_s``, ``sgformer_m``, ``sgformer_b`` build an ``SGFormer``;
``load_checkpoint`` loads the authors' weights (``.pth`` in their layouts, or
``.safetensors``); ``save_safetensors`` exports weights.

When timm is installed (``pip install 'sgattn[timm]'``) the three models are
registered with timm as soon as both ``sgattn`` and ``timm`` are imported, in
either order, so ``timm.create_model("sgformer_s", ...)`` works;
``register_timm()`` does it explicitly. Without timm everything else works.
"""
import importlib.abc
import importlib.util
import sys

from .sgformer import (SGFormer, checkpoint_state_dict, load_checkpoint, read_checkpoint, save_safetensors,
                       sgformer_b, sgformer_m, sgformer_s)

__all__ = ["SGFormer", "load_checkpoint", "read_checkpoint", "checkpoint_state_dict", "save_safetensors",
           "sgformer_s", "sgformer_m", "sgformer_b", "register_timm"]


def register_timm() -> None:
    """Register sgformer_s/m/b with timm (imports timm; raises ImportError
    with the install command when it is missing)."""
    try:
        import timm  # noqa: F401
    except ImportError as exc:
        raise ImportError("timm is not installed: pip install 'sgattn[timm]' (or pip install timm)") from exc
    from ._timm import register
    register()


class _RegisterAfterTimmImport(importlib.abc.MetaPathFinder):
    """Registers the models right after ``import timm`` finishes, so that
    ``import sgattn`` does not have to import timm (seconds) itself."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "timm":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # once; and the lookup below must not find this finder again
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            try:
                register_timm()
            except Exception as exc:  # never break timm's own import
                import warnings
                warnings.warn(f"sgattn could not register its models with timm: {exc}")

        spec.loader.exec_module = exec_and_register
        return spec


if "timm" in sys.modules:
    register_timm()
elif importlib.util.find_spec("timm") is not None:
    sys.meta_path.insert(0, _RegisterAfterTimmImport())
