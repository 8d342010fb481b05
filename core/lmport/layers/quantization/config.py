"""What a quantized checkpoint says about its format, and the per-layer method it implies."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from lmport.layers.linear import Linear, LinearMethod


class QuantizationConfig:
    """One checkpoint's quantization: the format's parameters, read from its ``quantization_config``.

    A model passes it to every :class:`~lmport.layers.linear.Linear` (``ModelContext.quantization``);
    :meth:`linear_method` picks the method for one layer. ``ignore``: module-name patterns (a
    plain name matches itself and anything under it; ``re:`` prefixes a regular expression) left
    in full precision, as compressed-tensors' ``ignore`` and transformers' ``modules_to_not_convert`` list them.
    """

    name = "none"

    def __init__(self, ignore: Iterable[str] = ()):
        self.ignore = tuple(ignore)

    def linear_method(self, layer: "Linear") -> "LinearMethod":
        raise NotImplementedError

    def ignores(self, module_name: str) -> bool:
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.fullmatch(pattern[3:], module_name) or re.search(pattern[3:] + "$", module_name):
                    return True
            elif module_name == pattern or module_name.endswith("." + pattern) or module_name.startswith(pattern + "."):
                return True
        return False

    def describe(self) -> str:
        return self.name
