"""Prompts fitted to the model's context, counted in the model's own tokens.

A character budget cannot bound a prompt: one CJK character is up to three byte-level tokens,
and a question is not budgeted at all.  LLaVA-1.5 has 4,096 positions, 576 of them taken by the
image, and whatever it generates needs room too; vLLM rejects a longer prompt and transformers
runs past its context (and its attention memory grows with the square of the length).  So every
prompt is fitted here, before any engine sees it, to

    ``max_model_len − image tokens − max_new_tokens`` text tokens

(the image term only when the prompt has an image): the lowest-ranked context items are
dropped first (a binary search over how many to keep), and when even the best item alone does
not fit, its caption is shortened (a binary search over its length).  A question that does not
fit without any context is the row's error, one line, and the engine never sees it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tasks.models.engines import IMAGE_TOKEN, format_prompt
from tasks.query.prompts import compose_prompt


class PromptTooLong(ValueError):
    """The question alone does not fit the model's context (the row's one-line error)."""


@dataclass(frozen=True)
class Budget:
    """The model's limits; ``tokens(text)`` counts a rendered prompt with its tokenizer."""

    max_model_len: int
    image_tokens: int
    max_new_tokens: int
    tokens: Callable[[str], int]
    special_tokens: tuple[str, ...] = ()

    @property
    def limit(self) -> int:
        """Prompt tokens allowed, image tokens included (so the text gets ``max_model_len −
        image tokens − max_new_tokens``)."""
        return self.max_model_len - self.max_new_tokens

    def count(self, inner: str, has_image: bool) -> int:
        """Prompt tokens as the engine sees them, image tokens included."""
        text = self.tokens(format_prompt(inner, has_image, IMAGE_TOKEN))
        return text - 1 + self.image_tokens if has_image else text


def tokenizer_budget(tokenizer, max_model_len: int, image_tokens: int,
                     max_new_tokens: int) -> Budget:
    """A ``Budget`` counting with ``tokenizer`` (a Hugging Face tokenizer, BOS included)."""
    specials = tuple(sorted({str(t) for t in tokenizer.all_special_tokens} - {""}))
    return Budget(max_model_len, image_tokens, max_new_tokens,
                  lambda text: len(tokenizer(text).input_ids), specials)


@dataclass(frozen=True)
class Fitted:
    prompt: str
    n_tokens: int | None  # prompt tokens incl. image tokens; None without a budget
    n_dropped: int  # context items left out


def _largest(lo: int, hi: int, fits: Callable[[int], bool]) -> int | None:
    """The largest n in lo..hi with ``fits(n)`` (monotone: true up to some n), or None."""
    if not fits(lo):
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def fit_prompt(question: str | None, hits: list[dict], *, has_query_image: bool, has_image: bool,
               budget: Budget | None, box_convention: str | None = None,
               max_caption_chars: int = 400, max_context_chars: int = 6000) -> Fitted:
    """The prompt with as many context items as fit ``budget`` (all of them without one)."""
    special = budget.special_tokens if budget else ()

    def build(keep: int, caption: int = max_caption_chars) -> tuple[str, int]:
        return compose_prompt(question, hits, has_query_image=has_query_image, keep=keep,
                              max_caption_chars=caption, max_context_chars=max_context_chars,
                              special_tokens=special, box_convention=box_convention)

    if budget is None:
        prompt, kept = build(len(hits))
        return Fitted(prompt, None, len(hits) - kept)
    limit = budget.limit
    counts: dict[tuple[int, int], int] = {}

    def fits(keep: int, caption: int = max_caption_chars) -> bool:
        if (keep, caption) not in counts:
            counts[keep, caption] = budget.count(build(keep, caption)[0], has_image)
        return counts[keep, caption] <= limit

    keep = _largest(0, len(hits), fits)
    if keep is None:
        images = f", {budget.image_tokens} of them image tokens" if has_image else ""
        raise PromptTooLong(
            f"question too long: its prompt takes {counts[0, max_caption_chars]} tokens without "
            f"any context{images}; the model allows {limit} (max_model_len "
            f"{budget.max_model_len} − {budget.max_new_tokens} new tokens)")
    caption = max_caption_chars
    if keep == 0 and hits:  # the best item alone is too long: shorten its caption
        shorter = _largest(0, max_caption_chars, lambda c: fits(1, c))
        if shorter is not None:
            keep, caption = 1, shorter
    prompt, kept = build(keep, caption)
    return Fitted(prompt, counts[keep, caption], len(hits) - kept)
