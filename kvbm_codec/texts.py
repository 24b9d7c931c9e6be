"""Where calibration and evaluation text comes from, kept apart on purpose.

Calibration uses the Python reference manual's topic pages (`pydoc_data`, shipped with every
CPython, so calibration is reproducible offline). Evaluation uses anything else: the demo's
bundled GNU GPL v3 text (legal prose, a different domain), or any file the user passes.
"""

from __future__ import annotations

from importlib import resources


def calibration_texts() -> list[str]:
    import pydoc_data.topics as topics

    return [topics.topics[k] for k in sorted(topics.topics)]


def demo_document() -> str:
    return resources.files("kvbm_codec.data").joinpath("gpl-3.0.txt").read_text(encoding="utf-8")


def demo_conversation(tokenizer: object, document: str | None = None) -> str:
    """A chat-templated conversation: a user shares a long document and asks about it."""
    doc = document if document is not None else demo_document()
    messages = [
        {"role": "system", "content": "You are a careful assistant who answers questions about documents."},
        {"role": "user", "content": f"Here is a document I need help with:\n\n{doc}"},
        {"role": "assistant", "content": "I have read the document. What would you like to know?"},
        {"role": "user", "content": "Summarize what the document says about conveying modified versions."},
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # type: ignore[attr-defined]
