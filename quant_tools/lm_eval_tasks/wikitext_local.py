"""Documents and word-perplexity bookkeeping for the local WikiText-2 tasks (no hub download).

The text file is read whole (datasets' ``text`` builder with ``sample_by: document``) and cut into
articles at the top-level headings (`` = Title = ``). Articles ``[0, n/2)`` are the calibration
part (``quant_tools.calibrate`` draws its token windows only from there); articles ``[n/2, n)``
are the evaluation part. ``*_small`` tasks evaluate the first ``SMALL_ARTICLES`` articles of the
evaluation part, a subset sized for CPU runs.
"""

from __future__ import annotations

import re

SMALL_ARTICLES = 2
_HEADING = re.compile(r"^ = [^=].* = $")


def split_articles(text: str) -> list[str]:
    """Cut WikiText text into articles, each starting at its top-level heading line."""
    articles: list[list[str]] = []
    for line in text.splitlines(keepends=True):
        if _HEADING.match(line.rstrip("\n")) or not articles:
            articles.append([])
        articles[-1].append(line)
    return ["".join(a).strip("\n") + "\n" for a in articles if "".join(a).strip()]


def calibration_text(text: str) -> str:
    """The calibration half of ``text`` (disjoint from every evaluation task)."""
    arts = split_articles(text)
    return "".join(arts[: len(arts) // 2])


def evaluation_articles(text: str, limit: int | None = None) -> list[str]:
    arts = split_articles(text)
    held_out = arts[len(arts) // 2:]
    return held_out[:limit] if limit else held_out


_SUBS = [
    (re.compile(r" @(.)@ "), r"\1"),            # 1 @,@ 000 -> 1,000 ; well @-@ known -> well-known
    (re.compile(r" ([.,;:!?%)\]}])"), r"\1"),    # no space before closing punctuation
    (re.compile(r"([(\[{$]) "), r"\1"),          # no space after opening brackets
    (re.compile(r" (n't|'s|'re|'ve|'d|'ll|'m)\b"), r"\1"),
    (re.compile(r"(?m)^ +| +$"), ""),
]


def detokenize(page: str) -> str:
    """WikiText's space-separated tokens back to running text (what the model was trained on)."""
    for pat, rep in _SUBS:
        page = pat.sub(rep, page)
    return page


def _docs(dataset, limit):
    import datasets

    text = "".join(dataset["text"])
    return datasets.Dataset.from_dict({"page": evaluation_articles(text, limit)})


def eval_docs(dataset):
    return _docs(dataset, None)


def eval_docs_small(dataset):
    return _docs(dataset, SMALL_ARTICLES)


def doc_to_target(doc):
    return detokenize(doc["page"])


def process_results(doc, results):
    # Word perplexity counts the words of the original (tokenized) text, as WikiText results do.
    (loglikelihood,) = results
    words = len(doc["page"].split())
    nbytes = len(doc["page"].encode("utf-8"))
    return {"word_perplexity": (loglikelihood, words), "byte_perplexity": (loglikelihood, nbytes),
            "bits_per_byte": (loglikelihood, nbytes)}
