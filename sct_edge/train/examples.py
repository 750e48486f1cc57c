"""Examples from JSONL: tokens, loss masks, the train/validation split, and batches of right-padded examples.

How text becomes tokens (the same for training and for generation, so the model learns what it will see):

- Each record is first cut into segments of text, each marked trained or not. `text`: one trained segment.
  `prompt`/`completion`: the prompt (not trained) then the completion (trained), joined with nothing in
  between, as TRL does. `messages`: the whole conversation is rendered with the chat template; the assistant
  parts are found by rendering prefixes: for assistant message i, `render(messages[:i],
  add_generation_prompt=True)` ends where its text starts and `render(messages[:i + 1])` ends where it ends,
  so the assistant's segment is its content plus whatever the template closes a turn with (`<|im_end|>\\n`
  for ChatML), and the header that opens the turn (`<|im_start|>assistant\\n`) is prompt. A template whose
  prefix renders are not prefixes of the whole conversation is refused for that line.
- Each segment is tokenised on its own, without the tokenizer's automatic special tokens, as inference
  tokenises a prompt and then generates the answer after it. `text` and `prompt`/`completion` examples start
  with BOS when the tokenizer adds one to plain text; chat templates write BOS themselves when the model
  wants it.
- Each example ends with EOS: a trailing run of whitespace after the last EOS (ChatML's newline after the
  final `<|im_end|>`) is dropped, else EOS is appended. A tokenizer without an EOS token (the byte-level
  `tiny` default) ends each example with a blank line instead, the separator between plain-text documents.
- Target t (the token after position t) counts in the loss when its token belongs to a trained segment
  (with `train_on_prompt`, every token counts). Others get target `IGNORE_INDEX` (-100, what
  `F.cross_entropy` ignores); so do padding positions.

Examples are never packed together: a batch is a bucket of examples of similar length, each right-padded to
the longest in the batch (rounded up to `PAD_MULTIPLE`, at most `--seq`). With causal attention, padding after
an example cannot change its logits, and an example attends to nothing but itself. An example longer than
`seq + 1` tokens is truncated to its first `seq + 1` tokens (the count is reported).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sct_edge.convert.tokenizer import Tokenizer
from sct_edge.engine.step import IGNORE_INDEX
from sct_edge.errors import SctError
from sct_edge.train.chat_template import ChatTemplate, chat_template_for
from sct_edge.train.jsonl import CHAT, COMPLETION, TEXT, Record, read_jsonl

# Batches are padded to a multiple of this many positions, so a run sees few distinct shapes.
PAD_MULTIPLE = 16
# Examples are sorted by length within groups of this many batches: little padding, yet a random mix.
BUCKET_BATCHES = 8
NO_EOS_ENDING = "\n\n"


@dataclass
class TokenizedExample:
    """`ids` (int64) and `counted` (bool, same length): token t is a target whose loss counts."""

    where: str
    ids: np.ndarray
    counted: np.ndarray
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.ids)


def encode_without_specials(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of `text` without the tokenizer's automatic BOS/EOS (special tokens written in the text,
    such as `<|im_start|>`, are still recognised as the single tokens they are)."""
    if getattr(tokenizer, "kind", None) == "bpe":
        return tokenizer.tokenizer.encode(text, add_special_tokens=False).ids
    return tokenizer.encode(text)


def _adds_bos(tokenizer: Tokenizer) -> bool:
    return tokenizer.bos_id is not None and tokenizer.encode("a")[:1] == [tokenizer.bos_id]


def chat_segments(record: Record, template: ChatTemplate) -> list[tuple[str, bool]]:
    """A conversation as (text, is_assistant) segments whose concatenation is the whole rendering."""
    messages = list(record.messages or ())
    full = template.render_or_fail(messages, False, record.where)
    segments: list[tuple[str, bool]] = []
    done = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = template.render_or_fail(messages[:i], True, record.where)
        through = template.render_or_fail(messages[: i + 1], False, record.where)
        if not (full.startswith(through) and through.startswith(before) and len(before) >= done):
            raise SctError(f"{record.where}: the chat template ({template.source}) does not render this "
                           f"conversation as a sequence of prefixes (at message {i + 1}), so the assistant's "
                           "tokens cannot be told apart; use prompt/completion or text examples")
        segments += [(full[done : len(before)], False), (full[len(before) : len(through)], True)]
        done = len(through)
    segments.append((full[done:], False))
    return [(text, trained) for text, trained in segments if text]


def record_segments(record: Record, template: ChatTemplate | None) -> list[tuple[str, bool]]:
    """The record as (text, trained) segments; chat records need `template`."""
    if record.format == TEXT:
        return [(record.text or "", True)]
    if record.format == COMPLETION:
        return [(record.prompt or "", False), (record.completion or "", True)]
    if template is None:
        raise SctError(f"{record.where}: a chat example needs a chat template")
    return chat_segments(record, template)


def tokenize_record(record: Record, tokenizer: Tokenizer, template: ChatTemplate | None,
                    train_on_prompt: bool = False) -> TokenizedExample:
    """The record's tokens and which of them count in the loss (see the module docstring)."""
    ids: list[int] = []
    counted: list[bool] = []
    if record.format != CHAT and _adds_bos(tokenizer):
        ids.append(tokenizer.bos_id)
        counted.append(False)
    for text, trained in record_segments(record, template):
        piece = encode_without_specials(tokenizer, text)
        ids += piece
        counted += [trained or train_on_prompt] * len(piece)
    last_counts = bool(counted and counted[-1])
    eos = tokenizer.eos_id
    if eos is None:
        decoded = tokenizer.decode(ids)
        ending = NO_EOS_ENDING[len(decoded) - len(decoded.rstrip("\n")):] if decoded.endswith("\n") else NO_EOS_ENDING
        piece = encode_without_specials(tokenizer, ending)
        ids += piece
        counted += [last_counts or train_on_prompt] * len(piece)
    else:
        last_eos = max((i for i, t in enumerate(ids) if t == eos), default=None)
        if last_eos is not None and not tokenizer.decode(ids[last_eos + 1 :], skip_special_tokens=False).strip():
            del ids[last_eos + 1 :], counted[last_eos + 1 :]
        else:
            ids.append(eos)
            counted.append(last_counts or train_on_prompt)
    if not any(counted[1:]):
        raise SctError(f"{record.where}: nothing to train on (no completion or assistant tokens); "
                       "add an answer, or pass --train-on-prompt")
    return TokenizedExample(record.where, np.asarray(ids, dtype=np.int64), np.asarray(counted, dtype=bool))


def example_texts(path: Path, tokenizer: Tokenizer, chat_template: str | None) -> list[str]:
    """The text of every example of JSONL file `path` as the model reads it: `text`, prompt + completion, or
    the conversation rendered with `chat_template` (None: the default ChatML template). For other parts of
    sct-edge that need text from the user's data (calibration), without any masking."""
    fmt, records = read_jsonl(path)
    template = chat_template_for(chat_template, tokenizer, str(path)) if fmt == CHAT else None
    return ["".join(text for text, _ in record_segments(record, template)) for record in records]


def _stable_fraction(name: str) -> float:
    digest = hashlib.blake2b(f"split:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass
class ExampleData:
    """Tokenised training and validation examples, with what the start event reports about them."""

    train: list[TokenizedExample]
    val: list[TokenizedExample]
    source: str
    formats: dict[str, str]  # file -> its format
    val_source: str  # "held out" or the --val-data file(s)
    pad_id: int
    truncated: int
    train_on_prompt: bool
    seconds: float

    def counted_tokens(self, which: str = "train") -> int:
        return int(sum(e.counted[1:].sum() for e in getattr(self, which)))

    def describe(self) -> str:
        formats = ", ".join(sorted(set(self.formats.values())))
        truncated = f", {self.truncated} truncated to the sequence length" if self.truncated else ""
        what = "all tokens" if self.train_on_prompt else "completion/assistant tokens only"
        return (f"{self.source}: {formats} JSONL, {len(self.train)} train / {len(self.val)} validation examples "
                f"({self.val_source}){truncated}; loss on {what}: {self.counted_tokens():,} trained tokens, "
                f"tokenised in {self.seconds:.2f} s")

    def summary(self) -> dict[str, Any]:
        """For the start event."""
        return {"kind": "examples", "formats": self.formats, "train": len(self.train), "val": len(self.val),
                "val_source": self.val_source, "truncated": self.truncated, "train_on_prompt": self.train_on_prompt,
                "train_tokens_counted": self.counted_tokens()}

    def sampler(self, batch_size: int, seq_len: int, seed: int) -> ExampleSampler:
        return ExampleSampler(self.train, batch_size, seq_len, seed, self.pad_id)

    def eval_seq(self, seq_len: int) -> tuple[int, str | None]:
        """Validation uses the training sequence length: one example always fits (truncated if need be)."""
        return seq_len, None

    def eval_batches(self, seq_len: int, batch_size: int, max_windows: int | None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The first `max_windows` validation examples, `batch_size` at a time."""
        return eval_example_batches(self.val, seq_len, batch_size, self.pad_id, max_windows)

    def sample_prompt(self) -> list[int]:
        """The prompt of the first validation example (its tokens before the first counted one)."""
        example = self.val[0]
        first = int(np.argmax(example.counted[1:])) + 1
        return [int(t) for t in example.ids[:first]]


def _tokenize_files(paths: list[Path], tokenizer: Tokenizer, template_text: str | None, template_source: str,
                    train_on_prompt: bool) -> tuple[list[TokenizedExample], dict[str, str]]:
    examples: list[TokenizedExample] = []
    formats: dict[str, str] = {}
    template: ChatTemplate | None = None
    for path in paths:
        fmt, records = read_jsonl(path)
        formats[str(path)] = fmt
        if fmt == CHAT and template is None:
            template = chat_template_for(template_text, tokenizer, template_source)
        examples += [tokenize_record(record, tokenizer, template, train_on_prompt) for record in records]
    return examples, formats


def _truncate(examples: list[TokenizedExample], seq: int) -> int:
    count = 0
    for example in examples:
        if len(example) > seq + 1:
            example.ids, example.counted, example.truncated = example.ids[: seq + 1], example.counted[: seq + 1], True
            count += 1
    return count


def prepare_examples(paths: list[Path], val_paths: list[Path], tokenizer: Tokenizer, template_text: str | None,
                     template_source: str, seq: int, val_fraction: float, train_on_prompt: bool = False) -> ExampleData:
    """Tokenised examples of the JSONL files `paths`; validation is `val_paths` or, without them, a held-out
    share `val_fraction` of the examples (at least one), chosen by a hash of FILE:LINE (the same on every
    machine). Examples longer than `seq + 1` tokens are truncated."""
    started = time.perf_counter()
    train, formats = _tokenize_files(paths, tokenizer, template_text, template_source, train_on_prompt)
    source = ", ".join(str(p) for p in paths)
    if val_paths:
        val, val_formats = _tokenize_files(val_paths, tokenizer, template_text, template_source, train_on_prompt)
        formats.update(val_formats)
        val_source = ", ".join(str(p) for p in val_paths)
    else:
        if len(train) < 2:
            raise SctError(f"{source}: {len(train)} example; holding one out for validation leaves none to train "
                           "on (add examples, or pass --val-data FILE)")
        n_val = max(1, round(len(train) * val_fraction))
        held = set(sorted(range(len(train)), key=lambda i: _stable_fraction(train[i].where))[:n_val])
        val = [e for i, e in enumerate(train) if i in held]
        train = [e for i, e in enumerate(train) if i not in held]
        val_source = f"{n_val} held out"
    truncated = _truncate(train, seq) + _truncate(val, seq)
    pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0
    data = ExampleData(train=train, val=val, source=source, formats=formats, val_source=val_source, pad_id=pad_id,
                       truncated=truncated, train_on_prompt=train_on_prompt, seconds=time.perf_counter() - started)
    # Checked now rather than found at the first step or the last evaluation: answers cut off by the sequence
    # length would train on nothing, or validate on nothing.
    for which, where in (("train", source), ("val", val_source if val_paths else f"{source} (held out)")):
        if not data.counted_tokens(which):
            raise SctError(f"{where}: no {which} example has a trained token within the first {seq + 1} tokens "
                           "(the answers lie beyond the sequence length); raise --seq")
    return data


def padded_width(examples: list[TokenizedExample], seq: int) -> int:
    """The longest example's input length rounded up to `PAD_MULTIPLE`, at most `seq`."""
    longest = max(1, max(len(e) - 1 for e in examples))
    return min(seq, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)


def collate(examples: list[TokenizedExample], seq: int, pad_id: int, width: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets, (len(examples) x width) int64, right-padded (width: `padded_width` by default).
    Targets are `IGNORE_INDEX` where the loss must not count."""
    width = width or padded_width(examples, seq)
    x = np.full((len(examples), width), pad_id, dtype=np.int64)
    y = np.full((len(examples), width), IGNORE_INDEX, dtype=np.int64)
    for row, example in enumerate(examples):
        n = min(len(example) - 1, width)
        x[row, :n] = example.ids[:n]
        y[row, :n] = np.where(example.counted[1 : n + 1], example.ids[1 : n + 1], IGNORE_INDEX)
    return torch.from_numpy(x), torch.from_numpy(y)


@dataclass
class ExampleSampler:
    """Training batches of whole examples, right-padded, with the resumable cursor of `data.BatchSampler`.

    Epoch e shuffles the examples with `default_rng([seed, e])`, sorts each group of `BUCKET_BATCHES` batches
    by length (less padding), cuts them into batches of `batch_size` and shuffles the batches; the last batch
    of an epoch may be smaller. The cursor (epoch, position) is all the state there is."""

    examples: list[TokenizedExample] = field(repr=False)
    batch_size: int
    seq_len: int
    seed: int
    pad_id: int
    epoch: int = field(default=0, init=False)
    position: int = field(default=0, init=False)
    _batches: list[np.ndarray] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.examples:
            raise SctError("there are no training examples")

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.examples))
        group = self.batch_size * BUCKET_BATCHES
        batches = []
        for start in range(0, len(order), group):
            chunk = order[start : start + group]
            chunk = chunk[np.argsort([len(self.examples[i]) for i in chunk], kind="stable")]
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def _next_batch(self) -> list[TokenizedExample]:
        if self._batches is None:
            self._batches = self._epoch_batches(self.epoch)
        batch = self._batches[self.position]
        self.position += 1
        if self.position == len(self._batches):
            self.epoch, self.position, self._batches = self.epoch + 1, 0, None
        return [self.examples[i] for i in batch]

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return collate(self._next_batch(), self.seq_len, self.pad_id)

    def draw(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The micro-batches of one step, padded to one width (the engine runs a step's micro-batches with
        one set of rotary tables)."""
        batches = [self._next_batch() for _ in range(n)]
        width = max(padded_width(batch, self.seq_len) for batch in batches)
        return [collate(batch, self.seq_len, self.pad_id, width) for batch in batches]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "n_examples": len(self.examples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        for name in ("seed", "batch_size", "seq_len", "n_examples"):
            if state.get(name) != mine[name]:
                raise SctError(f"sampler state was saved with {name}={state.get(name)} but this run has {mine[name]}; "
                               "resuming would not draw the same batches")
        self.epoch, self.position, self._batches = int(state["epoch"]), int(state["position"]), None


def eval_example_batches(examples: list[TokenizedExample], seq: int, batch_size: int, pad_id: int,
                         max_examples: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The validation examples in order, `batch_size` at a time, at most `max_examples` of them, all padded to
    one width (the engine evaluates them as the micro-batches of one forward pass)."""
    chosen = examples[:max_examples]
    width = padded_width(chosen, seq)
    return (collate(chosen[i : i + batch_size], seq, pad_id, width) for i in range(0, len(chosen), batch_size))
