"""Package data `stepaudio2.ensemble`: the pipeline models (`pipeline`, `generate`, `text_generate`).

Installed with the package so `stepaudio2 serve` works from a wheel; the launcher copies the folders into its
runtime repository.
"""
