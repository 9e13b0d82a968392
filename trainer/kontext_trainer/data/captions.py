"""Captions as the users' guide writes them: trigger word (ending in a comma) + the edit instruction."""

from __future__ import annotations

import re

TRIGGER_PLACEHOLDER = "[trigger]"


def clean_caption(text: str) -> str:
    """One line, single spaces: caption files often end with a newline or hold wrapped lines."""
    return re.sub(r"\s+", " ", text).strip()


def compose_caption(instruction: str, trigger_word: str | None) -> str:
    """`"XM, retouch the jewellery"` from instruction `"retouch the jewellery"` and trigger word `"XM,"`.

    A caption that already starts with the trigger word is kept as is, and `[trigger]` anywhere in it is
    replaced by the trigger word (ai-toolkit's convention), so captions written either way work.
    """
    instruction = clean_caption(instruction)
    if not trigger_word:
        return instruction.replace(TRIGGER_PLACEHOLDER, "").strip()
    if TRIGGER_PLACEHOLDER in instruction:
        return clean_caption(instruction.replace(TRIGGER_PLACEHOLDER, trigger_word))
    if instruction.startswith(trigger_word) or instruction.startswith(trigger_word.rstrip(",") + " "):
        return instruction
    return f"{trigger_word} {instruction}"


def dropped_caption(trigger_word: str | None) -> str:
    """What a caption dropped by `training.captionDropout` becomes: the trigger word alone, or the empty caption
    without one (ai-toolkit's `get_dropout_caption` in toolkit/dataloader_mixins.py does the same)."""
    return trigger_word or ""
