"""The offline Qwen2 tokenizer: Qwen2's ids on real strings, its special tokens, and vocab checks."""

from __future__ import annotations

import json

import pytest

from qwen2_megatron.data.tokenizer import QwenTokenizer, TokenizerError, default_tokenizer_file
from qwen2_megatron.model.presets import get_preset
from tests.data_fixtures import tokenizer  # noqa: F401

# Qwen2's ids: the first two as published for Qwen2 (platform.md); the rest pinned from Qwen's BPE,
# whose first 151,646 ids are Qwen2's, so a change of tokenizer file or of id trimming fails here.
KNOWN = {
    "Hello world": [9707, 1879],
    "你好": [108386],
    "こんにちは世界": [89015, 99489],
    "안녕하세요": [126246, 144370, 91145],
    "Привет мир": [53645, 26991, 8178, 137144],
    "def f(x):\n    return x+1": [750, 282, 2075, 982, 262, 470, 856, 10, 16],
    "😀 emoji 🎉": [141334, 42365, 11162, 236, 231],
}


def test_known_ids_on_real_strings(tokenizer: QwenTokenizer) -> None:
    for text, ids in KNOWN.items():
        assert tokenizer.encode(text) == ids, text
        assert tokenizer.decode(ids) == text
    batch = tokenizer.encode_batch(list(KNOWN))
    assert [b.tolist() for b in batch] == list(KNOWN.values())


def test_special_tokens_and_vocab_size(tokenizer: QwenTokenizer) -> None:
    assert tokenizer.vocab_size == 151646
    assert tokenizer.eod_id == 151643
    assert tokenizer.encode("<|endoftext|><|im_start|><|im_end|>") == [151643, 151644, 151645]
    # Qwen3's later control tokens are not Qwen2's: they must tokenise as plain text.
    assert all(i < 151643 for i in tokenizer.encode("<think></think><tool_call>"))


def test_model_vocab_checks(tokenizer: QwenTokenizer) -> None:
    for preset in ("qwen2_0.5b", "qwen2_7b", "tiny"):
        tokenizer.check_model_vocab(get_preset(preset).vocab_size)
    with pytest.raises(TokenizerError, match="smaller than the tokenizer"):
        tokenizer.check_model_vocab(384)
    with pytest.raises(TokenizerError, match="another tokenizer"):
        tokenizer.check_model_vocab(200_064)


def test_user_directory_and_wrong_tokenizer(tmp_path) -> None:
    spec = json.loads(default_tokenizer_file().read_text(encoding="utf-8"))
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    assert QwenTokenizer(str(tmp_path)).encode("Hello world") == [9707, 1879]
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] != "<|im_end|>"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(TokenizerError, match="not Qwen2's tokenizer"):
        QwenTokenizer(str(tmp_path))
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        QwenTokenizer(str(tmp_path / "missing"))
