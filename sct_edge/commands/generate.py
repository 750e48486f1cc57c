"""`sct-edge generate STORE --prompt TEXT`: stream text from a store's model (KV cache, blocks paged)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sct_edge.errors import SctError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="sample text from a store's model")
    p.add_argument("store", type=Path, help="store directory")
    p.add_argument("--prompt", required=True, help="text to continue (or the user message with --chat)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy")
    p.add_argument("--top-k", type=int, default=40, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message, rendered with the "
                   "store's chat template (the default ChatML when the store has none)")
    p.add_argument("--profile", default="steamdeck", help="profile that bounds memory (blocks are paged under it)")
    p.add_argument("--budget", help="override the profile's memory budget, e.g. 1GiB")
    p.set_defaults(func=run)


def chat_prompt_ids(store, tokenizer, message: str) -> list[int]:
    """A one-turn chat prompt as the model was fine-tuned on it: `message` as the user's turn, rendered with
    the store's own chat template (the default ChatML without one) and the assistant's turn opened."""
    from sct_edge.train.chat_template import chat_template_for
    from sct_edge.train.examples import encode_without_specials

    template = chat_template_for(store.extra.get("chat_template"), tokenizer, f"store {store.path}")
    text = template.render_or_fail([{"role": "user", "content": message}], True, "--chat")
    return encode_without_specials(tokenizer, text)


def run(args: argparse.Namespace) -> int:
    from sct_edge.convert.tokenizer import tokenizer_from_json
    from sct_edge.engine.process import ProcessSettings, configure_process
    from sct_edge.engine.profile import load_profile
    from sct_edge.engine.sampling import generate
    from sct_edge.store.store import Store
    from sct_edge.train.trainer import inference_engine

    if args.max_new_tokens < 1:
        raise SctError("--max-new-tokens must be at least 1")
    store = Store.open(args.store)
    tokenizer = tokenizer_from_json(store.tokenizer_json())
    prompt = chat_prompt_ids(store, tokenizer, args.prompt) if args.chat else tokenizer.encode(args.prompt)
    if not prompt:
        raise SctError("--prompt is empty")
    configure_process(ProcessSettings.for_profile(load_profile(args.profile, args.budget)))
    engine = inference_engine(store, args.profile, args.budget, len(prompt) + args.max_new_tokens)
    out: list[int] = []
    printed = 0
    stop = {tokenizer.eos_id} if tokenizer.eos_id is not None else set()

    def stream(token: int) -> None:
        # Decode the whole continuation each time: a multi-byte character may span several tokens.
        nonlocal printed
        out.append(token)
        decoded = tokenizer.decode(out)
        if not decoded.endswith("\ufffd"):
            sys.stdout.write(decoded[printed:])
            sys.stdout.flush()
            printed = len(decoded)

    if not args.chat:
        sys.stdout.write(args.prompt)
    try:
        generate(engine, prompt, args.max_new_tokens, args.temperature, args.top_k or None, args.seed, stop, stream)
    finally:
        engine.close()
    sys.stdout.write(tokenizer.decode(out)[printed:] + "\n")
    return 0
