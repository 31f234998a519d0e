"""dstune: turn a causal LM and domain data into a specialised, evaluated model ready to deploy.

The Python API mirrors the CLI: `from dstune import api; api.run("recipes/icd10_lora.yaml")`.
"""

import logging

from .errors import DstuneError, InputError

# bitsandbytes' CPU backend looks for an optional hub kernel at import (peft imports it) and warns when it is
# absent; these machines have no hub, and the built-in CPU kernel is used instead.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"

__all__ = ["DstuneError", "InputError"]
