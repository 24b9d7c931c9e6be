"""The broad calibration corpus: every domain builds from installed files, deterministically, and
never contains the evaluation or validation texts."""

from __future__ import annotations

import pytest

from kvbm_codec.calibration.corpus import (
    DOMAINS,
    broad_corpus,
    code_texts,
    dialogue_texts,
    docs_texts,
    roff_to_text,
    tables_texts,
)
from kvbm_codec.models.hf import CausalLM
from kvbm_codec.texts import demo_document


def test_roff_text_keeps_words_and_accents() -> None:
    src = (
        '.\\" a comment\n.TH APT 8\n.SH "NOM"\napt \\- le transport d\\*(AqAPT pour t\\(\'el\\(\'echarger\n'
        ".B \\fBgras\\fR\n.br\nna\\(:ive \\[u00E9]t\\('e dans le\\~paquet\n"
    )
    text = roff_to_text(src)
    assert "NOM" in text and "comment" not in text and ".TH" not in text
    assert "apt - le transport d'APT pour télécharger" in text
    assert "gras" in text and "\\f" not in text
    assert "naïve été dans le paquet" in text


def test_stdlib_domains_are_deterministic_and_bounded() -> None:
    for build in (docs_texts, code_texts, tables_texts):
        a, b = build(50_000), build(50_000)
        assert a == b and 50_000 <= sum(map(len, a)) < 50_000 + 25_000
    assert any("def " in t for t in code_texts(20_000))
    assert any("| sin(x) |" in t for t in tables_texts(50_000))


@pytest.mark.slow
def test_broad_corpus_has_every_domain_and_no_evaluation_text(smollm: CausalLM) -> None:
    corpus = broad_corpus(smollm.tokenizer, max_chars=40_000)
    # docs, code, dialogue and tables come from CPython and the pinned packages: always present
    assert {"docs", "code", "dialogue", "tables"} <= set(corpus) <= set(DOMAINS)
    dialogue = corpus["dialogue"][0]
    assert dialogue.startswith("<|im_start|>system") and "<|im_start|>assistant" in dialogue
    # nothing process-dependent: difflib's defaults once put memory addresses in the signatures
    full = dialogue_texts(smollm.tokenizer)
    assert any("difflib.HtmlDiff(" in t for t in full)
    assert not any(" at 0x" in t for t in full)
    gpl_line = demo_document().splitlines()[10].strip()
    for domain, texts in corpus.items():
        assert texts, domain
        for t in texts:
            assert "GNU GENERAL PUBLIC LICENSE" not in t and "Apache License" not in t
            assert not gpl_line or gpl_line not in t
    with pytest.raises(ValueError, match="unknown corpus domains"):
        broad_corpus(smollm.tokenizer, domains=("docs", "poetry"))
