"""The demo's synthetic task: short product reviews, a word-level tokenizer built in code, and the
"gold" preference rule a human rater would apply.

Prompts ask for a review of one of a few things ("review the hotel :"). Demonstrations are
imperfect: adjectives are drawn at random, so half the reviews are negative, and one in five
talks about the wrong thing. The gold rule prefers replies that are positive, varied, on topic and
finished:

    gold = sum of the sentiment of the distinct adjectives
           + 1 if the reply names the prompt's subject, - 1 if it names another one
           - 2 if the reply never ends (no <eos> within the response length)
"""

from __future__ import annotations

import numpy as np

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = range(4)
SENTIMENT = {
    "amazing": 3,
    "wonderful": 3,
    "great": 2,
    "lovely": 2,
    "good": 1,
    "nice": 1,
    "okay": 0,
    "plain": 0,
    "dull": -1,
    "bad": -1,
    "boring": -2,
    "poor": -2,
    "awful": -3,
    "terrible": -3,
}
SUBJECTS = ("movie", "book", "meal", "hotel", "game", "show", "song", "trip")
PROMPTS = ("review the {s} :", "how was the {s} ?", "tell me about the {s} :")
REPLIES = (
    "the {s} was {a} .",
    "the {s} was {a} and {b} .",
    "it was {a} , {b} and {c} .",
    "i found the {s} {a} .",
    "a really {a} {s} .",
)
FILLER = ("review", "the", "how", "was", "tell", "me", "about", ":", "?", "it", "and", "i", "found",
          "a", "really", ".", ",")  # fmt: skip
VOCAB = SPECIALS + tuple(dict.fromkeys(FILLER + SUBJECTS + tuple(SENTIMENT)))
TOKEN_ID = {w: i for i, w in enumerate(VOCAB)}
PROMPT_LEN = 8
RESPONSE_LEN = 12


def encode(text: str) -> list[int]:
    return [TOKEN_ID.get(w, UNK) for w in text.split()]


def decode(ids: np.ndarray | list[int]) -> str:
    """Words up to (and without) the first <eos>; padding dropped."""
    words = []
    for i in ids:
        if i == EOS:
            break
        if i != PAD:
            words.append(VOCAB[i])
    return " ".join(words)


def hf_tokenizer():
    """The same word-level vocabulary as a `transformers` fast tokenizer (for exported models)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(dict(TOKEN_ID), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )


def sample_prompts(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(tokens [n, PROMPT_LEN] left-padded, mask, subject index [n])`."""
    subjects = rng.integers(len(SUBJECTS), size=n)
    templates = rng.integers(len(PROMPTS), size=n)
    tokens = np.full((n, PROMPT_LEN), PAD, np.int32)
    for i, (s, t) in enumerate(zip(subjects, templates)):
        ids = [BOS] + encode(PROMPTS[t].format(s=SUBJECTS[s]))
        tokens[i, PROMPT_LEN - len(ids) :] = ids
    return tokens, tokens != PAD, subjects


def sample_demonstrations(rng: np.random.Generator, subjects: np.ndarray) -> np.ndarray:
    """Imperfect demonstrations `[n, RESPONSE_LEN]` (right-padded, ending in <eos>): random
    adjectives, and the wrong subject one time in five."""
    adjectives = list(SENTIMENT)
    out = np.full((len(subjects), RESPONSE_LEN), PAD, np.int32)
    for i, s in enumerate(subjects):
        if rng.random() < 0.2:
            s = rng.integers(len(SUBJECTS))
        a, b, c = rng.choice(adjectives, size=3)
        text = REPLIES[rng.integers(len(REPLIES))].format(s=SUBJECTS[s], a=a, b=b, c=c)
        ids = encode(text) + [EOS]
        out[i, : len(ids)] = ids
    return out


_SENTIMENT_BY_ID = np.zeros(len(VOCAB), np.float32)
for _word, _value in SENTIMENT.items():
    _SENTIMENT_BY_ID[TOKEN_ID[_word]] = _value
_SUBJECT_IDS = np.array([TOKEN_ID[s] for s in SUBJECTS])


def gold_score(responses: np.ndarray, subjects: np.ndarray) -> np.ndarray:
    """The gold rule (module docstring) for responses `[n, T]` and prompt subjects `[n]`."""
    scores = np.zeros(len(responses), np.float32)
    for i, (row, subject) in enumerate(zip(np.asarray(responses), subjects)):
        stop = np.flatnonzero(row == EOS)
        words = row[: stop[0]] if len(stop) else row
        scores[i] = _SENTIMENT_BY_ID[np.unique(words)].sum()
        named = set(words.tolist()) & set(_SUBJECT_IDS.tolist())
        if _SUBJECT_IDS[subject] in named:
            scores[i] += 1
        elif named:
            scores[i] -= 1
        if not len(stop):
            scores[i] -= 2
    return scores
