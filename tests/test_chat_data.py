"""JSONL examples: the three formats tokenised and masked against hand-worked examples, SmolLM2's own chat
template rendered as its reference, padding never changing an example's logits, and bad input as one-line
errors that name the file and line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from sct_edge.convert.tokenizer import ByteTokenizer
from sct_edge.errors import SctError
from sct_edge.model.config import get_preset
from sct_edge.model.transformer import Transformer
from sct_edge.train.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplate, chat_template_for
from sct_edge.train.examples import (
    IGNORE_INDEX,
    ExampleSampler,
    collate,
    example_texts,
    prepare_examples,
    tokenize_record,
)
from sct_edge.train.jsonl import read_jsonl

BYTES = ByteTokenizer()
CHATML = chat_template_for(None, BYTES, "test")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def one_example(tmp_path: Path, row: dict, train_on_prompt: bool = False):
    _, (record,) = read_jsonl(write_jsonl(tmp_path / "one.jsonl", [row]))
    return tokenize_record(record, BYTES, CHATML, train_on_prompt)


def targets(example, seq: int = 64) -> list[int]:
    _, y = collate([example], seq, pad_id=0)
    return y[0].tolist()


def test_text_example_trains_on_every_token_and_ends_with_a_blank_line(tmp_path):
    example = one_example(tmp_path, {"text": "ab"})
    # The byte tokenizer has no EOS: the example ends with a blank line, and every target counts.
    assert example.ids.tolist() == [97, 98, 10, 10]
    assert targets(example, seq=8) == [98, 10, 10, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX,
                                       IGNORE_INDEX]


def test_completion_example_counts_only_the_completion(tmp_path):
    example = one_example(tmp_path, {"prompt": "Q:", "completion": "A"})
    assert example.ids.tolist() == [ord("Q"), ord(":"), ord("A"), 10, 10]
    # Position 0 predicts ':' (prompt: ignored); position 1 predicts 'A' (completion) and so on.
    assert targets(example, seq=4) == [IGNORE_INDEX, ord("A"), 10, 10]
    with_prompt = one_example(tmp_path, {"prompt": "Q:", "completion": "A"}, train_on_prompt=True)
    assert targets(with_prompt, seq=4) == [ord(":"), ord("A"), 10, 10]


def test_chat_example_counts_the_assistant_turn_and_its_end_marker(tmp_path):
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "OK"}]}
    example = one_example(tmp_path, row)
    prompt = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    answer = "OK<|im_end|>\n\n"
    assert BYTES.decode(example.ids.tolist()) == prompt + answer
    expected = [IGNORE_INDEX] * (len(prompt) - 1) + list(answer.encode())
    assert targets(example, seq=len(prompt + answer) - 1) == expected


def test_multi_turn_chat_counts_each_assistant_turn_only(tmp_path):
    row = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                        {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                        {"role": "assistant", "content": "d"}]}
    example = one_example(tmp_path, row)
    text = BYTES.decode(example.ids.tolist())
    counted = "".join(ch for ch, flag in zip(text, example.counted.tolist(), strict=True) if flag)
    assert counted == "b<|im_end|>\nd<|im_end|>\n\n"


@pytest.fixture(scope="module")
def smollm2_source(smollm2_gguf):
    from sct_edge.convert.gguf_reader import read_gguf

    return read_gguf(smollm2_gguf)


def test_smollm2_template_renders_as_its_reference(smollm2_gguf, smollm2_source):
    source = smollm2_source
    template = chat_template_for(source.chat_template, source.tokenizer, str(smollm2_gguf))
    messages = [{"role": "user", "content": "What is SCT?"}, {"role": "assistant", "content": "Spectral training."}]
    reference = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                 "<|im_start|>user\nWhat is SCT?<|im_end|>\n"
                 "<|im_start|>assistant\nSpectral training.<|im_end|>\n")
    assert template.render(messages) == reference
    assert template.render(messages[:1], add_generation_prompt=True) == reference.split("Spectral")[0]
    assert template.eos_token == "<|im_end|>"


def test_smollm2_chat_tokens_end_with_eos_and_count_the_answer(tmp_path, smollm2_gguf, smollm2_source):
    source = smollm2_source
    tok = source.tokenizer
    template = chat_template_for(source.chat_template, tok, str(smollm2_gguf))
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                               {"role": "assistant", "content": "Hello!"}]}])
    _, (record,) = read_jsonl(path)
    example = tokenize_record(record, tok, template)
    # The trailing newline after the final <|im_end|> (SmolLM2's EOS) is dropped: the example ends on EOS.
    assert example.ids[-1] == tok.eos_id == tok.token_to_id("<|im_end|>")
    assert example.ids[example.counted].tolist() == tok.encode("Hello!") + [tok.eos_id]
    assert tok.decode(example.ids.tolist(), skip_special_tokens=False) == template.render(record.messages)[:-1]


def test_padding_and_other_examples_never_change_an_examples_logits():
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(get_preset("tiny"), n_layers=2), seed=0).eval()
    short = torch.randint(0, 256, (1, 5))
    long_a, long_b = torch.randint(0, 256, (1, 12)), torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        alone = model(short)[0]
        # The same example right-padded beside another example, then beside a different one.
        batch_a = model(torch.cat([torch.nn.functional.pad(short, (0, 7)), long_a]))
        batch_b = model(torch.cat([torch.nn.functional.pad(short, (0, 7), value=99), long_b]))
    torch.testing.assert_close(batch_a[0, :5], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batch_b[0, :5], alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batch_a[1], batch_b[1])


def test_collate_pads_to_the_longest_rounded_up_and_truncation_is_counted(tmp_path):
    rows = [{"text": "x" * 3}, {"text": "y" * 40}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    data = prepare_examples([path], [path], BYTES, None, "test", seq=16, val_fraction=0.1)
    # "y" * 40 plus the blank line is 42 tokens > seq + 1 = 17: cut to 17, in train and in validation.
    assert data.truncated == 2
    x, y = collate(data.train, 16, data.pad_id)
    assert x.shape == y.shape == (2, 16)
    assert (y[0] != IGNORE_INDEX).sum() == 4  # "xxx\n\n" has 5 tokens, 4 targets
    x_small, _ = collate(data.train[:1], 16, data.pad_id)
    assert x_small.shape == (1, 16)  # 4 positions rounded up to the padding multiple of 16


def test_held_out_split_and_sampler_resume(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"example {i}"} for i in range(40)])
    data = prepare_examples([path], [], BYTES, None, "test", seq=32, val_fraction=0.1)
    assert (len(data.train), len(data.val)) == (36, 4)
    assert not {e.where for e in data.train} & {e.where for e in data.val}
    first = ExampleSampler(data.train, 5, 32, seed=3, pad_id=0)
    expected = [next(first) for _ in range(12)]
    resumed = ExampleSampler(data.train, 5, 32, seed=3, pad_id=0)
    [next(resumed) for _ in range(7)]
    state = resumed.state_dict()
    again = ExampleSampler(data.train, 5, 32, seed=3, pad_id=0)
    again.load_state_dict(state)
    for x, y in expected[7:]:
        x2, y2 = next(again)
        assert torch.equal(x, x2) and torch.equal(y, y2)
    # One epoch draws every training example exactly once.
    seen = sorted(row[: int((row != 0).sum())].tolist().__repr__() for x, _ in expected[:8] for row in x)
    assert len(seen) == 36


def test_example_texts_renders_each_format(tmp_path):
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "u"},
                                                            {"role": "assistant", "content": "a"}]}])
    completion = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "completion": "c"}])
    assert example_texts(chat, BYTES, None) == ["<|im_start|>user\nu<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"]
    assert example_texts(completion, BYTES, None) == ["pc"]
    assert ChatTemplate(DEFAULT_CHAT_TEMPLATE, "t").render([], add_generation_prompt=True) == "<|im_start|>assistant\n"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (['{"text": "a"}', '{"text": '], "t.jsonl:2: invalid JSON"),
        ([{"prompt": "a"}], "t.jsonl:1: missing field 'completion'"),
        ([{"text": "a"}, {"other": 1}], "t.jsonl:2: missing field: an example needs 'text'"),
        ([{"messages": [{"role": "bot", "content": "x"}]}], "t.jsonl:1: message 1 has unknown role 'bot'"),
        ([{"text": "a"}, "", {"prompt": "p", "completion": "c"}], "t.jsonl:3: a completion example, but the file's "
         "first example (line 1) is text"),
        ([], "t.jsonl: the file is empty"),
        (["[1, 2]"], "t.jsonl:1: expected a JSON object"),
        ([{"text": 3}], "t.jsonl:1: field 'text' must be a string"),
    ],
)
def test_bad_jsonl_is_a_one_line_error_naming_file_and_line(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    with pytest.raises(SctError) as error:
        read_jsonl(path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_template_that_fails_to_render_names_the_line(tmp_path):
    template = ChatTemplate("{% if messages[0]['role'] != 'system' %}{{ raise_exception('needs a system prompt') }}"
                            "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}", "store X")
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "system", "content": "s"},
                                                            {"role": "user", "content": "u"},
                                                            {"role": "assistant", "content": "a"}]},
                                              {"messages": [{"role": "user", "content": "u"},
                                                            {"role": "assistant", "content": "a"}]}])
    _, records = read_jsonl(path)
    assert tokenize_record(records[0], BYTES, template).counted.any()
    with pytest.raises(SctError, match=r"c\.jsonl:2: the chat template \(store X\) failed .*needs a system prompt"):
        tokenize_record(records[1], BYTES, template)
    with pytest.raises(SctError, match="store Y: the chat template does not compile"):
        ChatTemplate("{% for %}", "store Y")


def test_a_conversation_without_an_answer_is_refused_unless_training_on_the_prompt(tmp_path):
    row = {"messages": [{"role": "user", "content": "only a question"}]}
    with pytest.raises(SctError, match=r"one\.jsonl:1: nothing to train on"):
        one_example(tmp_path, row)
    assert one_example(tmp_path, row, train_on_prompt=True).counted.any()
