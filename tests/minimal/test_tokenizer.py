import pytest

from minimal.tokenizer import N_SPECIAL, SPECIAL_TOKENS, VOCAB_SIZE, get_tokenizer, make_encoding, special_id, train_bpe

TEXT = "the cat sat on the mat. the cat ate the rat. that hat is flat; the mat is that cat's."


def test_trainer_is_deterministic_and_learns_frequent_pairs():
    a = train_bpe([TEXT], vocab_size=300, n_special=4)
    b = train_bpe([TEXT], vocab_size=300, n_special=4)
    assert a == b
    assert len(a) > 256
    assert b" the" in a and b"at" in a  # the most frequent pieces become tokens
    assert all(a[bytes([i])] == i for i in range(256))  # every byte keeps its own rank


def test_first_merge_is_the_most_frequent_pair():
    ranks = train_bpe(["ab ab ab cd"], vocab_size=257 + 4, n_special=4)
    assert max(ranks, key=ranks.get) == b"ab"


def test_round_trip_on_arbitrary_unicode():
    enc = get_tokenizer()
    for s in ["", "plain ascii", "héllo wörld", "日本語のテキスト", "emoji 🤖🧪", "\x00\x01 tabs\t\nnew", "Ω≈ç√∫"]:
        assert enc.decode(enc.encode_ordinary(s)) == s


def test_shipped_vocabulary_and_special_tokens():
    enc = get_tokenizer()
    assert enc.n_vocab == VOCAB_SIZE
    assert len(SPECIAL_TOKENS) == N_SPECIAL
    ids = enc.encode("a<|answer|>b<|endoftext|>", allowed_special="all")
    assert special_id(enc, "<|answer|>") in ids and ids[-1] == special_id(enc, "<|endoftext|>")
    assert special_id(enc, "<|endoftext|>") == VOCAB_SIZE - N_SPECIAL
    with pytest.raises(ValueError, match="unknown special token"):
        special_id(enc, "<|nope|>")


def test_tiktoken_encoding_matches_trainer_on_training_text():
    ranks = train_bpe([TEXT], vocab_size=300, n_special=len(SPECIAL_TOKENS))
    enc = make_encoding(ranks)
    ids = enc.encode_ordinary(TEXT)
    assert len(ids) < len(TEXT.encode()) / 2  # the merges compress the text they were learned on
    assert enc.decode(ids) == TEXT


def test_too_small_vocabulary_is_an_error():
    with pytest.raises(ValueError, match="room for 256 bytes"):
        train_bpe([TEXT], vocab_size=200)
