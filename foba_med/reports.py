"""Free-text MIMIC-CXR radiology reports: sections, the training prompt, tokenizer-length truncation.

A MIMIC-CXR report (``files/pXX/pXXXXXXXX/sXXXXXXXX.txt``) is plain text with upper-case headings at the
start of a line, each followed by a colon, e.g.::

                                     FINAL REPORT
     EXAMINATION:  CHEST (PA AND LAT)

     INDICATION:  ___F with cough

     FINDINGS:

     There is a moderate left pleural effusion.  The right lung is
     clear.

     IMPRESSION:

     Moderate left pleural effusion.

Lines are wrapped at about 78 characters and paragraphs are separated by blank lines. The paper fine-tunes
the LDM on the *impression* of each report (supplement, "Medical" fine-tuning details).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

logger = logging.getLogger(__name__)

# A heading: upper-case words at the start of a line, then a colon. Lower-case words followed by a colon
# ("compared to the prior study: stable") and times ("AT 10:04 PM") are text, not headings.
_HEADING = re.compile(r"^[ \t]*([A-Z][A-Z ()/,&'-]*?)[ \t]*:", re.MULTILINE)
_LIST_NUMBER = re.compile(r"^\s*\d{1,2}\s*[.)]\s+")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")
_PREAMBLE_TITLES = re.compile(r"\bFINAL REPORT\b")

PROMPT_SOURCES = ("impression", "findings", "last_paragraph", "none")


def _section_key(heading: str) -> str:
    """Canonical name of a heading: CONCLUSION counts as impression, any FINDINGS heading as findings."""
    name = " ".join(heading.lower().split())
    if "impression" in name or "conclusion" in name:
        return "impression"
    if "finding" in name:
        return "findings"
    return name


def clean_text(text: str) -> str:
    """Return ``text`` with wrapped lines joined, list numbers ("1. ", "2) ") dropped and whitespace collapsed."""
    pieces: list[str] = []
    for line in text.splitlines():
        item = _LIST_NUMBER.match(line)
        if item:
            line = line[item.end():]
            # a new list item starts a new sentence
            if pieces and not pieces[-1].rstrip().endswith((".", ";", ":", "!", "?")):
                pieces[-1] = pieces[-1].rstrip() + "."
        if line.strip():
            pieces.append(line.strip())
    return " ".join(" ".join(pieces).split())


def parse_sections(text: str) -> dict[str, str]:
    """Return the report's sections as {name: cleaned text}, e.g. "impression", "findings", "indication".

    Names are the lower-cased headings; CONCLUSION (and headings such as "FINDINGS AND IMPRESSION") count as
    "impression", any other heading containing FINDING as "findings"; repeated sections are concatenated.
    Text before the first heading (minus the "FINAL REPORT" title) is "preamble". Empty sections are left out.
    """
    sections: dict[str, str] = {}

    def add(key: str, body: str) -> None:
        body = clean_text(body)
        if body:
            sections[key] = f"{sections[key]} {body}" if key in sections else body

    matches = list(_HEADING.finditer(text))
    add("preamble", _PREAMBLE_TITLES.sub(" ", text[: matches[0].start()] if matches else text))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        add(_section_key(m.group(1)), text[m.end():end])
    return sections


def _last_paragraph(text: str) -> str:
    """The last non-empty paragraph of ``text`` (blank-line separated), without a leading heading label."""
    for paragraph in reversed(_BLANK_LINE.split(text)):
        paragraph = _PREAMBLE_TITLES.sub(" ", paragraph)
        heading = _HEADING.match(paragraph.lstrip("\n"))
        if heading:
            paragraph = paragraph.lstrip("\n")[heading.end():]
        paragraph = clean_text(paragraph)
        if paragraph:
            return paragraph
    return ""


def choose_prompt(text: str) -> tuple[str, str]:
    """Return (prompt, source) for a report: the impression, else the findings, else the last paragraph.

    ``source`` is one of ``PROMPT_SOURCES``; ("", "none") when the report has no text at all.
    """
    sections = parse_sections(text)
    for key in ("impression", "findings"):
        if sections.get(key):
            return sections[key], key
    paragraph = _last_paragraph(text)
    return (paragraph, "last_paragraph") if paragraph else ("", "none")


def _fits(tokenizer, text: str, max_length: int) -> bool:
    return len(tokenizer(text, add_special_tokens=True)["input_ids"]) <= max_length


def truncate_prompts(prompts: Sequence[str], tokenizer, max_length: int | None = None) -> tuple[list[str], int]:
    """Return (prompts cut to the text encoder's length, number cut), logging how many were cut.

    The limit is ``tokenizer.model_max_length`` (or ``max_length``) and counts the BOS/EOS tokens the
    tokenizer adds. A prompt is cut after its last whole word that fits, so that re-tokenising the cut
    prompt gives the same leading tokens (needs a tokenizer that returns offsets, i.e. a fast tokenizer).
    """
    limit = int(max_length or tokenizer.model_max_length)
    if limit <= 2 or limit > 1_000_000:
        raise ValueError(f"tokenizer length limit {limit} is not usable; pass max_length= explicitly")
    out: list[str] = []
    n_cut = 0
    for prompt in prompts:
        try:
            enc = tokenizer(prompt, add_special_tokens=True, truncation=True, max_length=limit,
                            return_offsets_mapping=True, return_overflowing_tokens=True)
        except NotImplementedError as err:
            name = type(tokenizer).__name__
            raise TypeError(f"truncate_prompts needs a fast tokenizer that returns offsets; got {name}") from err
        windows = enc["offset_mapping"]  # one row per window of `limit` tokens
        if len(windows) <= 1:
            out.append(prompt)
            continue
        offsets = windows[0]
        cut = max((end for start, end in offsets if end > start), default=0)
        if cut < len(prompt) and prompt[cut].isalnum() and cut > 0 and prompt[cut - 1].isalnum():
            cut = prompt.rfind(" ", 0, cut) + 1  # do not split a word: drop its kept sub-tokens too
        short = prompt[:cut].rstrip()
        while short and not _fits(tokenizer, short, limit):
            short = short[: max(short.rfind(" "), 0)].rstrip()
        out.append(short)
        n_cut += 1
    level = logging.WARNING if n_cut else logging.INFO
    logger.log(level, "truncated %d of %d prompts to %d tokens (incl. BOS/EOS)", n_cut, len(prompts), limit)
    return out, n_cut
