from setuptools import find_packages, setup

setup(
    name="sgattn",
    version="0.1.0",
    description="Kernel-accelerated SG-Former attention (hybrid-scale and self-guided) for PyTorch",
    packages=find_packages(include=["sgattn", "sgattn.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.0"], "test": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["sgattn=sgattn.cli:main"]},
)
