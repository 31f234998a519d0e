"""dstune: turn a causal LM and domain data into a specialised, evaluated model ready to deploy.

The Python API mirrors the CLI: `from dstune import api; api.run("recipes/icd10_lora.yaml")`.
"""

from .errors import DstuneError, InputError

__version__ = "0.1.0"

__all__ = ["DstuneError", "InputError"]
