"""Model families: what differs between Qwen-VL generations, behind one small interface (layer L2, bottom).

`ktr.model.families.base` holds the interface (`ModelFamily`), the registry and the module finders (`core`,
`vision_tower`, `language_model`); one file per family registers it. Adding a family is one subclass (only the
pieces that differ) and one `register_family` call; the probes and the module never see it.
"""

from ktr.model.families.base import (FAMILIES, QUANT_SKIP_MODULES, REFUSED, ModelFamily, core, family_of, get_family,
                                     language_model, register_family, row_features, tiny_family, vision_tower)
from ktr.model.families.qwen2 import QWEN2_5_VL, QWEN2_VL
from ktr.model.families.qwen3vl import QWEN3_VL
from ktr.model.families.qwen35 import QWEN3_5
from ktr.model.families.qwen35 import REFUSED as _QWEN35_REFUSED

for _family in (QWEN2_5_VL, QWEN2_VL, QWEN3_VL, QWEN3_5):
    register_family(_family)
REFUSED.update(_QWEN35_REFUSED)

__all__ = ["FAMILIES", "QUANT_SKIP_MODULES", "REFUSED", "ModelFamily", "core", "family_of", "get_family",
           "language_model", "register_family", "row_features", "tiny_family", "vision_tower"]
