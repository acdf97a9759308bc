"""sgattn: pure Python, plus optional native extensions.

- ``sgattn._C`` (CPU ops, OpenMP): built whenever torch and a C++ compiler are
  present. ``SGATTN_BUILD_CPU=0`` skips it, ``=1`` makes a failed build fatal.
- ``sgattn._C_cuda`` (CUDA kernels from ``kernels/``): built when torch has
  CUDA and nvcc is found. ``SGATTN_BUILD_CUDA=0/1`` forces either way. Needs
  ``TORCH_CUDA_ARCH_LIST`` on a machine without a GPU (default "8.0;9.0").

An extension that was only auto-detected and fails to build is skipped with a
warning, so the install still succeeds as pure Python; ``sgattn.available_backends()``
then says how to build it. A build without native extensions prints a banner
saying so (pip shows it with ``-v``).

Extras: ``[timm]`` (timm registration, safetensors), ``[viz]`` (pictures and
the demo: matplotlib, Pillow, scikit-learn), ``[kvpress]`` (kvpress's presses
scored by sgattn, ``sgattn.integrations.kvpress``; brings transformers), ``[bench]`` (pytest-benchmark,
matplotlib), ``[triton]``, ``[test]``, ``[all]``.
"""
import os
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None  # auto


def _warn(msg):
    print(f"sgattn setup: {msg}", file=sys.stderr)


def _loud(reason):
    bar = "=" * 78
    _warn(f"\n{bar}\nsgattn: building WITHOUT native extensions: {reason}.\n"
          "The pure-Python reference backend (and Triton on a GPU) will be used; the CPU extension\n"
          "(OpenMP kernels) and the CUDA extension are NOT built. To build them against your torch:\n"
          "    pip install torch ninja && pip install --no-build-isolation .\n"
          f"`sgattn info` lists the backends and why any is missing.\n{bar}")


def _have_cxx():
    cxx = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    return shutil.which(cxx.split()[0]) is not None


def _write_op_header(out_dir):
    """Generate the op names header from sgattn/_schemas.py (the single source)."""
    namespace = {}
    with open(os.path.join(HERE, "sgattn", "_schemas.py")) as f:
        exec(compile(f.read(), "_schemas.py", "exec"), namespace)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "sgattn_op_names.h")
    text = namespace["cpp_header"]()
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def _extensions():
    want_cpu, want_cuda = _flag("SGATTN_BUILD_CPU"), _flag("SGATTN_BUILD_CUDA")
    if want_cpu is False and want_cuda is not True:
        _loud("SGATTN_BUILD_CPU=0")
        return [], {}, set()
    if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
        # torch would otherwise guess CUDA_HOME from nvcc on PATH (e.g. /usr/local), missing the headers.
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as exc:  # no torch at build time: pure Python install
        if want_cpu or want_cuda:
            raise RuntimeError(f"SGATTN_BUILD_CPU/CUDA=1 but torch cannot be imported: {exc}")
        _loud(f"torch is not importable at build time ({type(exc).__name__}: {exc}); an isolated build "
              "(plain `pip install .`) never sees your torch")
        return [], {}, set()
    if not _have_cxx():
        if want_cpu or want_cuda:
            raise RuntimeError("SGATTN_BUILD_CPU/CUDA=1 but no C++ compiler was found")
        _loud("no C++ compiler found")
        return [], {}, set()

    gen = os.path.join(HERE, "build", "sgattn_generated")
    _write_op_header(gen)
    include_dirs = [gen, os.path.join(HERE, "kernels"), os.path.join(HERE, "csrc")]
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    if _flag("SGATTN_CPU_NATIVE") is not False:
        cxx_flags.append("-march=native")  # AVX2/AVX-512 for the vectorised loops; source builds only
    exts, required = [], set()

    # Each extension implements the ops for its dispatch key only (the schemas
    # are defined from Python), so either builds and loads without the other.
    if want_cpu is not False:
        exts.append(cpp_extension.CppExtension(
            "sgattn._C", ["csrc/cpu_ops.cpp"], include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"]))
        if want_cpu:
            required.add("sgattn._C")

    cuda_home = cpp_extension.CUDA_HOME
    has_nvcc = cuda_home is not None and os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))
    build_cuda = want_cuda if want_cuda is not None else (torch.version.cuda is not None and has_nvcc)
    if build_cuda:
        if torch.version.cuda is None or not has_nvcc:
            raise RuntimeError("SGATTN_BUILD_CUDA=1 needs a CUDA build of torch and nvcc "
                               f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cuda_home})")
        arch = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        if "PTX" not in arch.upper():
            # PTX of the top architecture: newer GPUs (Blackwell) JIT it instead of
            # failing with "no kernel image is available" at the first call.
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch.rstrip("; ") + "+PTX"
        # cublas/cusparse headers of the pip CUDA wheels (torch headers include them).
        site = os.path.dirname(os.path.dirname(torch.__file__))
        cu_inc = [p for p in (os.path.join(site, "nvidia", v, "include") for v in ("cu13", "cu12"))
                  if os.path.isdir(p)]
        exts.append(cpp_extension.CUDAExtension(
            "sgattn._C_cuda", ["csrc/cuda_ops.cpp", "kernels/cuda_launch.cu"],
            include_dirs=include_dirs + cu_inc,
            extra_compile_args={"cxx": ["-O3", "-std=c++20"],
                                "nvcc": ["-O3", "-std=c++17", "-lineinfo"]}))
        if want_cuda:
            required.add("sgattn._C_cuda")

    class Build(cpp_extension.BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if ext.name in required:
                    raise
                _warn(f"optional extension {ext.name} failed to build ({exc}); continuing without it")

    return exts, {"build_ext": Build.with_options(use_ninja=shutil.which("ninja") is not None)}, required


ext_modules, cmdclass, _ = _extensions()

EXTRAS = {
    "timm": ["timm>=1.0", "safetensors"],
    "viz": ["matplotlib", "pillow", "scikit-learn"],
    "kvpress": ["kvpress>=0.5.5"],
    "bench": ["pytest", "pytest-benchmark", "matplotlib"],
    "triton": ["triton>=3.0"],
    "test": ["pytest", "pytest-benchmark"],
}
EXTRAS["all"] = sorted({r for reqs in EXTRAS.values() for r in reqs})

setup(
    name="sgattn",
    version="0.1.0",
    description="Kernel-accelerated SG-Former attention (hybrid-scale and self-guided) for PyTorch",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["sgattn", "sgattn.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["sgattn=sgattn.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
