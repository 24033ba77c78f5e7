"""Chapter 1 (ch1_introduction.ipynb) exercise checkers: the reference solutions pass, typical mistakes fail."""

from chapters.ch1_introduction import cost_model as cm
from chapters.exercises import check
from minimal.tokenizer import get_tokenizer, special_id
from tests.helpers import check_fails as fails
from tests.helpers import check_passes as passes


def stub(*args):
    raise NotImplementedError


def test_unfilled_stubs_report_not_implemented(capsys):
    for name, answer in (("ch1.memory", None), ("ch1.lcs_length", stub), ("ch1.kshot_keep", stub),
                         ("ch1.chat_labels", stub)):
        assert not check(name, answer)
        assert "not implemented yet" in capsys.readouterr().out


# ---------------------------------------------------------------------------- memory prediction

SHAPE = cm.llama2_shape("llama-2-13b")
PHI, PHI_T = cm.param_count(SHAPE), cm.lora_param_count(SHAPE, 64)


def test_memory_reference_passes(capsys):
    passes("ch1.memory", ((2 * PHI + 14 * PHI) / 1e9, (2 * PHI + 14 * PHI_T) / 1e9), capsys)


def test_memory_rounded_to_one_decimal_passes(capsys):
    passes("ch1.memory", (round(16 * PHI / 1e9, 1), round((2 * PHI + 14 * PHI_T) / 1e9, 1)), capsys)


def test_memory_lora_charged_like_full_fails(capsys):
    fails("ch1.memory", (16 * PHI / 1e9, 16 * PHI / 1e9), capsys, "only the trainable parameters")


def test_memory_lora_without_frozen_weights_fails(capsys):
    fails("ch1.memory", (16 * PHI / 1e9, 16 * PHI_T / 1e9), capsys, "frozen weights are still held")


def test_memory_weights_only_fails(capsys):
    fails("ch1.memory", (2 * PHI / 1e9, 2 * PHI / 1e9), capsys, "16 bytes per parameter")


def test_memory_lora_without_master_weights_fails(capsys):
    fails("ch1.memory", (16 * PHI / 1e9, (2 * PHI + 10 * PHI_T) / 1e9), capsys, "LoRA")


def test_memory_wrong_type_fails(capsys):
    fails("ch1.memory", 208.3, capsys, "a pair of numbers")


# ---------------------------------------------------------------------------- LCS

def lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a, 1):
        for j, y in enumerate(b, 1):
            table[i][j] = table[i - 1][j - 1] + 1 if x == y else max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


def test_lcs_reference_passes(capsys):
    passes("ch1.lcs_length", lcs, capsys)


def test_lcs_longest_common_substring_fails(capsys):
    def substring(a, b):
        best = 0
        for i in range(len(a)):
            for j in range(len(b)):
                n = 0
                while i + n < len(a) and j + n < len(b) and a[i + n] == b[j + n]:
                    n += 1
                best = max(best, n)
        return best
    fails("ch1.lcs_length", substring, capsys, "expected")


def test_lcs_common_words_fails(capsys):
    fails("ch1.lcs_length", lambda a, b: len(set(a) & set(b)), capsys, "expected")


def test_lcs_greedy_match_fails(capsys):
    def greedy(a, b):  # walk b once, matching each word of a at its first later occurrence
        n, j = 0, 0
        for x in a:
            try:
                j = b.index(x, j) + 1
                n += 1
            except ValueError:
                pass
        return n
    fails("ch1.lcs_length", greedy, capsys, "expected")


# ---------------------------------------------------------------------------- k-shot truncation

def keep(lengths, query_len, room):
    start, total = 0, query_len + sum(lengths)
    while start < len(lengths) and total > room:
        total -= lengths[start]
        start += 1
    return list(range(start, len(lengths)))


def test_kshot_keep_reference_passes(capsys):
    passes("ch1.kshot_keep", keep, capsys)


def test_kshot_keep_dropping_from_the_right_fails(capsys):
    def from_right(lengths, query_len, room):
        kept = keep(lengths[::-1], query_len, room)
        return sorted(len(lengths) - 1 - i for i in kept)
    fails("ch1.kshot_keep", from_right, capsys, "expected")


def test_kshot_keep_strict_fit_fails(capsys):
    def strict(lengths, query_len, room):  # drops while total >= room: one token of the room is never used
        return keep(lengths, query_len, room - 1)
    fails("ch1.kshot_keep", strict, capsys, "expected")


def test_kshot_keep_forgetting_the_query_fails(capsys):
    fails("ch1.kshot_keep", lambda lengths, query_len, room: keep(lengths, 0, room), capsys, "expected")


# ---------------------------------------------------------------------------- chat loss mask

def encode_chat(messages, loss_on_marker=False, loss_on_eot=True, loss_on_user=False):
    enc = get_tokenizer()
    eot = special_id(enc, "<|endoftext|>")
    ids, labels = [], []
    for m in messages:
        marker = special_id(enc, f"<|{m['role']}|>")
        content = enc.encode(m["content"])
        ids += [marker] + content
        if m["role"] == "assistant":
            ids.append(eot)
            labels += [marker if loss_on_marker else -100] + content + [eot if loss_on_eot else -100]
        else:
            labels += [-100] + (content if loss_on_user else [-100] * len(content))
    return ids, labels


def test_chat_labels_reference_passes(capsys):
    passes("ch1.chat_labels", encode_chat, capsys)


def test_chat_labels_loss_on_the_assistant_marker_fails(capsys):
    fails("ch1.chat_labels", lambda m: encode_chat(m, loss_on_marker=True), capsys, "[[")


def test_chat_labels_no_loss_on_the_end_token_fails(capsys):
    fails("ch1.chat_labels", lambda m: encode_chat(m, loss_on_eot=False), capsys, "[[")


def test_chat_labels_loss_on_the_user_fails(capsys):
    fails("ch1.chat_labels", lambda m: encode_chat(m, loss_on_user=True), capsys, "loss mask")


def test_chat_labels_without_the_end_token_fails(capsys):
    def no_eot(messages):
        ids, labels = encode_chat(messages)
        eot = special_id(get_tokenizer(), "<|endoftext|>")
        keep = [i for i, t in enumerate(ids) if t != eot]
        return [ids[i] for i in keep], [labels[i] for i in keep]
    fails("ch1.chat_labels", no_eot, capsys, "ids")
