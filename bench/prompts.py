"""Prompt sets: the built-in set written for quantbench, and user files (one prompt a line, or JSON lines)."""

from __future__ import annotations

import json
from pathlib import Path

BUILTIN_PROMPTS = {
    "quantbench-v1": (
        "a storefront sign that reads 'OPEN 24 HOURS' in red neon letters",  # text rendering
        "a handwritten grocery list on lined paper: eggs, milk, bread, coffee",  # small text
        "close-up portrait of an elderly fisherman with a weathered face, soft window light",  # faces
        "a group photo of five friends laughing at a picnic table",  # several faces
        "macro photograph of a bumblebee on a lavender flower, visible pollen grains",  # fine texture
        "a hand-knitted wool sweater folded on a wooden chair, detailed stitches",  # texture
        "exactly three red apples and two green pears on a white plate",  # counting
        "seven colorful hot air balloons over a valley at sunrise",  # counting
        "a cozy isometric pixel-art bedroom with a cat sleeping on the bed",  # style, hard edges
        "a watercolor painting of a lighthouse in a storm",  # style, gradients
        "a glass of water on a marble table, refraction and caustics",  # transparency
        "a futuristic city street at night in the rain, reflections on the asphalt",  # many small lights
    )
}


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message says why."""


def read_prompt_file(path: Path) -> list[str]:
    """Prompts from a `.txt` file (one a line, blank lines and `#` comments skipped) or a `.jsonl` file
    (one JSON object a line with a `prompt` field, or a JSON string)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise PromptFileError(f"cannot read {path}: {error}") from None
    lines = [line.strip() for line in text.splitlines()]
    if path.suffix != ".jsonl":
        prompts = [line for line in lines if line and not line.startswith("#")]
    else:
        prompts = []
        for number, line in enumerate(lines, 1):
            if not line:
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as error:
                raise PromptFileError(f"{path}:{number}: not JSON ({error.msg})") from None
            prompt = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(prompt, str) or not prompt.strip():
                raise PromptFileError(f"{path}:{number}: expected a string or an object with a 'prompt' string")
            prompts.append(prompt.strip())
    if not prompts:
        raise PromptFileError(f"{path} holds no prompts")
    return prompts
