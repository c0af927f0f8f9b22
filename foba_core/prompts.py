"""The two prompts of the method (paper Sec. 3): y_f names the foreground object, y_b the background.

Every stage that conditions the LDM on a concept takes its prompt from here: stage 1 captures the
object word of y_f, fine-tuning trains background inpainting under y_b and synthesis under y_f,
refinement inpaints under y_b, and foreground/background guidance moves between the two.
"""

from __future__ import annotations

BACKGROUND_PROMPT = "a photo of a background"  # y_b (paper Sec. 3)


def object_prompt(word: str) -> str:
    """Return the foreground prompt y_f = "a photo of a {object}" for the object word (paper Sec. 3)."""
    return f"a photo of a {word}"
