"""A tiny local tokenizer for tests (built with `tokenizers`, nothing is downloaded).

`tiny_tokenizer()` is a word-level `PreTrainedTokenizerFast` whose special tokens sit where
`hf_utils` expects them (pad 0, bos 1, eos 2), followed by chat-role tokens and `WORDS`; unknown
words map to `<unk>`. Its `len()` is `TOKENIZER_SIZE`, so a tiny model with
`vocab_size >= TOKENIZER_SIZE` (e.g. `hf_utils.tiny_hf_model(..., vocab_size=64)`) shares it.
`save_tiny_tokenizer(path)` writes it (with a chat template) where `AutoTokenizer` loads it.
"""

from __future__ import annotations

from pathlib import Path

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
SPECIALS = (PAD, BOS, EOS, UNK, USER, ASSISTANT, SYSTEM)
WORDS = tuple(
    """the a cat dog sat on mat ran to park good bad happy sad big small red blue green one two
    three four five six seven eight nine ten tell me story about write poem summarise this post
    answer question yes no why how what . , ? !""".split()
)
TOKENIZER_SIZE = len(SPECIALS) + len(WORDS)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' ' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def tiny_tokenizer(
    *, pad_token: str | None = PAD, chat_template: str | None = CHAT_TEMPLATE
) -> transformers.PreTrainedTokenizerFast:
    """Word-level tokenizer: ids 0..6 are `SPECIALS` (pad, bos, eos, unk, user, assistant,
    system), then `WORDS`. `pad_token=None` builds one without a pad token (for error tests).
    Encoding adds no BOS/EOS."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM],
        **({} if pad_token is None else {"pad_token": pad_token}),
    )
    tokenizer.chat_template = chat_template
    tokenizer.padding_side = "left"
    return tokenizer


def save_tiny_tokenizer(path: str | Path, **kwargs) -> transformers.PreTrainedTokenizerFast:
    """Builds `tiny_tokenizer(**kwargs)`, saves it to `path` and returns it."""
    tokenizer = tiny_tokenizer(**kwargs)
    tokenizer.save_pretrained(str(path))
    return tokenizer


# ------------------------------------------------------------------- tiny models that share it


def save_tiny_models(directory: str | Path, *, family: str = "llama") -> dict[str, Path]:
    """Writes a tiny random causal LM (`policy`) and a one-label sequence classifier (`reward`)
    with a 64-token vocabulary (covering `tiny_tokenizer`) and the tokenizer, as safetensors HF
    directories under `directory`; returns their paths."""
    from hf_utils import tiny_hf_model

    sizes = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    paths = {}
    for name, head, seed in (("policy", "lm", 0), ("reward", "score", 1)):
        path = Path(directory) / name
        tiny_hf_model(family, head=head, seed=seed, **sizes).save_pretrained(
            path, safe_serialization=True
        )
        save_tiny_tokenizer(path)
        paths[name] = path
    return paths
