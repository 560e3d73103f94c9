"""Key-token attribution (Video-KTR): selection is pure maths (L1); the probes run the model (L2).

`select_top_ratio` is re-exported here; the probe functions live in `ktr.probes.visual`, `ktr.probes.temporal`
and `ktr.probes.keytokens` (imported on use, so `import ktr.probes` stays light).
"""

from ktr.probes.select import combine_masks, select_scope, select_top_ratio

__all__ = ["combine_masks", "select_scope", "select_top_ratio"]
