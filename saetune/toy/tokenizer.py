"""A word-level tokenizer for the toy task, as a ``transformers`` fast tokenizer.

One token per whitespace-separated word: every integer the task can produce (``14``, ``-5``)
is a single token, so the model computes arithmetic rather than spelling digits. The vocab
order is fixed (specials, words, integers ascending), so :func:`build_tokenizer` always gives
the same ids. ``<think> </think> <answer> </answer>`` are special tokens (never split, one id
each), ``<|endoftext|>`` is eos and pad, no BOS is added, and decoding joins tokens with single
spaces, so ``decode(encode(text)) == text`` for every task text.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast

from . import task

EOS = "<|endoftext|>"
UNK = "<unk>"

#: User turns become ``User : {content} Assistant :`` (the task's prompt); an assistant turn is
#: appended after a space, so [user, assistant] renders the example's ``text``. The user turn
#: already ends in ``Assistant :``, so ``add_generation_prompt`` adds nothing.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first %} {% endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "User : {{ message['content'] }} Assistant :"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ message['content'] }}"
    "{%- else -%}"
    "{{ raise_exception('the toy chat template knows the roles user and assistant, not ' + message['role']) }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def vocab() -> list[str]:
    """The token list in id order: eos, unk, the four trace tags, task words, integers."""
    lo, hi = task.value_range()
    return [EOS, UNK, *task.SPECIAL_WORDS, *task.WORDS, *(str(i) for i in range(lo, hi + 1))]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The toy tokenizer (deterministic: same vocab, same ids, every call)."""
    tokens = vocab()
    tok = Tokenizer(WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=UNK))
    tok.pre_tokenizer = WhitespaceSplit()
    # Tokens already in the vocab keep their ids; registering them as special makes them
    # match before pre-tokenization and marks them for skip_special_tokens.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in (EOS, UNK, *task.SPECIAL_WORDS)])
    # No decoder: the tokenizers library then joins tokens with single spaces.
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=UNK,
        additional_special_tokens=list(task.SPECIAL_WORDS),
        clean_up_tokenization_spaces=False,  # it would glue " ." and " ," onto the word before
        model_max_length=256,
        padding_side="right",
    )
    hf.chat_template = CHAT_TEMPLATE
    # transformers 5 makes AutoTokenizer rebuild any tokenizer that sits beside a qwen2
    # config.json as a byte-level BPE Qwen2Tokenizer, which would silently split "14" into "1 4"
    # and decode without spaces. An auto_map entry turns that override off, so AutoTokenizer
    # loads tokenizer.json as saved (do not pass trust_remote_code=True: there is no remote code).
    hf.init_kwargs["auto_map"] = {"AutoTokenizer": [None, "PreTrainedTokenizerFast"]}
    return hf
