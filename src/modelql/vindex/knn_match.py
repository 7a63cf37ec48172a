"""Which KNN (retrieval-override) fact a prompt asks for: one matcher for INFER and generation.

A KNN fact stores the FFN input `x_L` at the last token of "The <relation> of <entity> is". Every
entity's prompt of that relation shares most of that vector (on SmolLM2-135M a France fact had
cosine > 0.9 with "The capital of Germany is"), so the cosine says *which relation* is being asked
and the entity's name in the text says *about whom*: a fact takes part only when its entity is
named (`mentions`), and fires when its key is within `KNN_COSINE` of the current `x_L`.

`KnnRecall` carries that into generation: `runtime.generate` asks it, at the last position of the
prompt and of every generated token, whether a fact fires, and if so emits the fact's target tokens
(each fact at most once per sequence). The runtime only sees the small protocol (`layers`,
`forced`), so it does not depend on the vindex.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Sequence

import torch

from .format import KnnEntry

KNN_COSINE = 0.75
HOOK = "blocks.{layer}.ln2.hook_normalized"


def mentions(text: str, entity: str) -> bool:
    """`entity` appears in `text` as a whole word (case-insensitive)."""
    return re.search(r"(?<!\w)" + re.escape(entity.casefold()) + r"(?!\w)", text.casefold()) is not None


def _unit(v: torch.Tensor) -> torch.Tensor:
    n = v.norm()
    return v / n if n >= 1e-8 else v


def knn_override(residuals: dict[int, torch.Tensor], entries: Iterable, text: str | None = None,
                 ) -> tuple[object, float, int] | None:
    """(entry, cosine, layer) of the first layer (ascending) whose best key beats `KNN_COSINE`;
    with `text`, only the facts of entities the text names take part (module docstring)."""
    by_layer: dict[int, list] = {}
    for e in entries:
        if text is not None and not mentions(text, e.entity):
            continue
        by_layer.setdefault(int(e.layer), []).append(e)
    for layer in sorted(by_layer):
        if layer not in residuals:
            continue
        x = _unit(residuals[layer].float())
        keys = torch.stack([_unit(torch.as_tensor(e.key, dtype=torch.float32)) for e in by_layer[layer]])
        cos = keys @ x
        best = int(cos.argmax())
        if float(cos[best]) > KNN_COSINE:
            return by_layer[layer][best], float(cos[best]), layer
    return None


class KnnRecall:
    """The KNN facts of a patch session, as generation sees them (module docstring).

    `entries` is read on every call, so facts inserted or deleted while a server runs take effect
    on the next sequence step."""

    def __init__(self, entries: Callable[[], Sequence[KnnEntry]], tokenizer):
        self._entries = entries
        self._tokenizer = tokenizer

    def layers(self, text: str, fired: set) -> tuple[int, ...]:
        """The layers whose FFN input the matcher needs for `text`: those of the facts not yet
        fired whose entity it names (empty: nothing to capture, the forward pass stays the plain one)."""
        if self._tokenizer is None:
            return ()
        return tuple(sorted({int(e.layer) for e in self._entries()
                             if (e.entity.casefold(), e.relation) not in fired and mentions(text, e.entity)}))

    def forced(self, residuals: dict[int, torch.Tensor], text: str, fired: set) -> list[int] | None:
        """The token ids to emit next if a fact not yet in `fired` (its (entity, relation)) fires
        (it is added), else None."""
        entries = [e for e in self._entries() if (e.entity.casefold(), e.relation) not in fired]
        if not entries:
            return None
        hit = knn_override(residuals, entries, text)
        if hit is None:
            return None
        entry = hit[0]
        fired.add((entry.entity.casefold(), entry.relation))
        target = str(entry.target_token).strip()
        lead = "" if not text or text[-1].isspace() else " "
        ids = self._tokenizer.encode(lead + target, add_special_tokens=False)
        return list(ids) or [int(entry.target_id)]
