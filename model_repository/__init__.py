"""Package data `stepaudio2.model_repository`: one folder per Triton model (config.pbtxt + 1/model.py).

Installed with the package so `stepaudio2 serve` works from a wheel; the launcher copies the folders into its
runtime repository. Not a Python module tree: Triton loads each 1/model.py by path.
"""
