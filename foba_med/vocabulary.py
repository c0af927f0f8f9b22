"""The eight MS-CXR findings and the words of a report that express them.

The paper scores, for each MS-CXR image and finding, the summed cross-attention of ALL tokens of the
finding's words (supplement: "Because some words are unknown to the language encoder, they were split into
different tokens. In this case, we compute the sum over the attention maps of all tokens."). This module finds
those words in a prompt as character spans; the attention code maps spans to token indices via offsets.

Choices (documented in docs/mimic.md):
- inflections and spelling variants count (effusions, atelectatic, atelectases, consolidations, oedema,
  opacities, opacification, pneumothoraces);
- "pleural effusion" is one phrase (both words carry the finding); a bare "effusion" also counts;
- cardiomegaly also appears as a description of the heart or cardiac silhouette being enlarged ("enlarged
  heart", "cardiac enlargement", "the heart is moderately enlarged"); the whole phrase is the span;
- no hypernyms or causes: "collapse", "infiltrate", "congestion", "infection", "density" are not matched,
  and neither are compounds such as "hydropneumothorax" (whole words only);
- negation is not handled: "no pneumothorax" still yields the span of "pneumothorax" (callers decide).
"""

from __future__ import annotations

import re
from functools import lru_cache

from monai.utils import look_up_option

CATEGORIES = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Lung Opacity",
    "Pleural Effusion",
    "Pneumonia",
    "Pneumothorax",
)

# "{deg}" stands for an optional degree adverb ("mildly", "moderately", ...).
_DEGREE = r"(?:(?:mildly|moderately|markedly|severely|slightly|massively|minimally|substantially)\s+)?"

DISEASE_TERMS: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("atelectasis", "atelectases", "atelectatic"),
    "Cardiomegaly": (
        "cardiomegaly",
        "enlarged heart",
        "enlarged cardiac silhouette",
        "cardiac enlargement",
        "enlargement of the cardiac silhouette",
        "heart is {deg}enlarged",
        "cardiac silhouette is {deg}enlarged",
        "heart size is {deg}enlarged",
    ),
    "Consolidation": ("consolidation", "consolidations", "consolidative", "consolidated"),
    "Edema": ("edema", "oedema", "edematous"),
    "Lung Opacity": ("opacity", "opacities", "opacification", "opacifications", "opacified"),
    "Pleural Effusion": ("pleural effusion", "pleural effusions", "effusion", "effusions"),
    "Pneumonia": ("pneumonia", "pneumonias"),
    "Pneumothorax": ("pneumothorax", "pneumothoraces", "pneumothoraxes"),
}


def category_name(category: str) -> str:
    """Return the canonical MS-CXR category name for ``category`` (any case, '_' or ' '), or raise."""
    by_lower = {c.lower(): c for c in CATEGORIES}
    key = " ".join(category.replace("_", " ").lower().split())
    return by_lower[look_up_option(key, tuple(by_lower))]


@lru_cache(maxsize=None)
def _pattern(category: str) -> re.Pattern[str]:
    """One case-insensitive regex matching any term of ``category`` as whole words."""
    terms = []
    for term in DISEASE_TERMS[category]:
        regex, after_degree = "", True  # no separator at the start or after the (optional) adverb
        for word in term.replace("{deg}", "{deg} ").split():
            regex += "" if after_degree else r"\s+"
            regex += _DEGREE if word == "{deg}" else re.escape(word)
            after_degree = word == "{deg}"
        terms.append(regex)
    # longest alternatives first, so that "pleural effusion" wins over "effusion" at the same start
    terms.sort(key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(terms) + r")(?!\w)", re.IGNORECASE)


def find_disease_words(prompt: str, category: str) -> list[tuple[int, int]]:
    """Return the character spans (start, end) of the words expressing ``category`` in ``prompt``.

    Matching is case-insensitive on whole words; multi-word phrases give one span covering all their words;
    at one position the longer phrase wins. Returns [] when the prompt does not name the finding.
    """
    return [m.span() for m in _pattern(category_name(category)).finditer(prompt)]


def control_category(category: str) -> str:
    """Return the finding whose word stands in for ``category``'s in the wrong-word control: the next in ``CATEGORIES``."""
    index = CATEGORIES.index(category_name(category))
    return CATEGORIES[(index + 1) % len(CATEGORIES)]


def wrong_word_prompt(prompt: str, category: str) -> tuple[str, str]:
    """Return (the prompt with every word of ``category`` replaced by the control finding's first term, that finding).

    The wrong-word control of the evaluation: the same image and the same phrase around it, another finding's word
    ("Small left pleural effusion" -> "Small left pneumonia"); its map, scored against the true finding's boxes,
    says how much of an AUC the place alone earns. The prompt is returned unchanged when it names no such word.
    """
    other = control_category(category)
    word = DISEASE_TERMS[other][0]
    out, last = [], 0
    for start, end in find_disease_words(prompt, category):
        out += [prompt[last:start], word]
        last = end
    return "".join(out) + prompt[last:], other
