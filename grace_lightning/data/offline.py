"""The offline default dataset: real English Wikipedia text that any machine with PyPI has.

GRACE trains on ``echo_data_total.jsonl`` (supervised) and SimCSE's ``wiki1m_for_simcse.txt``
(unsupervised); neither can be fetched without the Hub / Google Drive (paper notes §4). The
``gensim`` wheel on PyPI ships, among its test data, an extract of an English Wikipedia dump:
``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`` (1.7 MB; 106 full
articles, ~6 MB of wikitext, Wikipedia text CC BY-SA). Install it WITHOUT its dependencies,
we never import it, we only read that file::

    pip install --no-deps gensim==4.4.0

From it we build, once, deterministically (fixed seed), into ``$GRACE_CACHE/data`` (default
``~/.cache/grace_lightning/data``), written atomically (temp file, then ``os.replace``):

- ``sup_triplets.jsonl`` (upstream fields ``query``/``positive``/``negative`` + ``source``):
  Inverse Cloze Task pairs (Lee et al. 2019, "Latent Retrieval for Weakly Supervised Open
  Domain QA"; the standard unsupervised way to make retrieval pairs from Wikipedia): the
  query is the first (topic) sentence of a paragraph, the positive is the rest of that
  paragraph (the GRACE policy prompt), and the negative is a paragraph from a *different
  top-level section of the same article* -- a hard negative: same entity and vocabulary, other
  content (like the hard negatives of the E5/Echo mix). Articles with one usable section take
  a paragraph of another article instead. Passages are cut at sentence boundaries to a few
  hundred characters, so CPU runs stay cheap.
- ``unsup_sentences.txt``: Wikipedia sentences of the same articles, one a line -- the same
  kind of text as SimCSE's wiki1m (unsupervised GRACE data).

Both files are shuffled once with the seed, so the "first 1 %" validation split of the
datamodule is a spread of articles, not the first article. They are then read by the normal
readers (``read_triplets`` / ``read_sentences``).
"""

from __future__ import annotations

import bz2
import hashlib
import html
import importlib.util
import json
import logging
import os
import random
import re
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

OFFLINE_PACKAGE = "gensim"
OFFLINE_PIP = "pip install --no-deps gensim==4.4.0"
WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
#: bump when the construction changes: the cache dir name includes it, old caches are ignored
BUILD_VERSION = "enwiki-ict-v1"
DEFAULT_SEED = 0

MAX_PASSAGE_CHARS = 600  # positives/negatives are cut at a sentence boundary below this
MIN_POSITIVE_SENTENCES = 2
MAX_TRIPLETS_PER_ARTICLE = 40  # keeps the few very long articles from dominating
MIN_SENTENCE_WORDS = 5
MAX_NEGATIVE_OVERLAP = 0.15  # Jaccard of content words; above it a negative may be a paraphrase
MAX_SENTENCE_WORDS = 80

# sections that hold lists or references, not prose
_SKIP_SECTIONS = {
    "see also",
    "references",
    "notes",
    "external links",
    "further reading",
    "bibliography",
    "sources",
    "citations",
    "footnotes",
    "gallery",
    "notes and references",
    "works cited",
    "references and notes",
    "primary sources",
    "secondary sources",
    "works",
    "filmography",
    "discography",
    "publications",
    "selected works",
    "awards",
}
_DROP_LINK_PREFIXES = {
    "file",
    "image",
    "category",
    "media",
    "wikt",
    "wiktionary",
    "wikipedia",
    "wp",
    "help",
    "template",
    "portal",
    "commons",
    "user",
    "talk",
    "special",
    "meta",
    "s",
    "q",
    "n",
    "b",
    "v",
    "voy",
    "wikisource",
    "wikiquote",
    "wikibooks",
    "simple",
}
_ABBREVIATIONS = {
    "mr",
    "mrs",
    "ms",
    "dr",
    "st",
    "jr",
    "sr",
    "vs",
    "etc",
    "e.g",
    "i.e",
    "c",
    "ca",
    "no",
    "vol",
    "pp",
    "p",
    "gen",
    "col",
    "lt",
    "fr",
    "ft",
    "mt",
    "inc",
    "ltd",
    "co",
    "corp",
    "approx",
    "fl",
    "b",
    "d",
    "jan",
    "feb",
    "mar",
    "apr",
    "jun",
    "jul",
    "aug",
    "sep",
    "sept",
    "oct",
    "nov",
    "dec",
    "prof",
    "rev",
    "sgt",
    "capt",
    "cf",
    "al",
    "ed",
    "eds",
    "op",
    "cit",
    "ibid",
    "u.s",
    "u.k",
    "a.d",
    "b.c",
    "fig",
    "est",
    "dept",
    "univ",
    "ave",
    "rd",
    "gov",
    "sen",
    "rep",
}


def data_cache_dir() -> Path:
    """$GRACE_CACHE/data, else ~/.cache/grace_lightning/data (same root as the model cache)."""
    root = Path(os.environ.get("GRACE_CACHE", Path.home() / ".cache" / "grace_lightning"))
    return root / "data"


def find_source() -> Path:
    """Path of the Wikipedia extract inside the installed gensim package, found without
    importing gensim (so ``pip install --no-deps`` is enough)."""
    spec = importlib.util.find_spec(OFFLINE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The offline default dataset is built from a Wikipedia extract shipped in the "
            f"'{OFFLINE_PACKAGE}' wheel, which is not installed. Install it with: {OFFLINE_PIP}"
            f" (or pick another data config, e.g. data=shared)."
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / WIKI_FILE
        if path.exists():
            return path
    raise FileNotFoundError(
        f"'{OFFLINE_PACKAGE}' is installed but has no {WIKI_FILE}; reinstall it with: {OFFLINE_PIP}"
    )


# --------------------------------------------------------------------------- wikitext


@dataclass
class Article:
    title: str
    sections: list[tuple[str, list[str]]] = field(default_factory=list)  # (heading, paragraphs)


def iter_pages(path: Path) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of the main-namespace, non-redirect pages of a MediaWiki XML dump."""
    with bz2.open(path, "rb") as f:
        for _, elem in ET.iterparse(f):
            if not elem.tag.endswith("}page"):
                continue
            ns = elem.tag[: -len("page")]
            title = elem.findtext(f"{ns}title") or ""
            namespace = elem.findtext(f"{ns}ns") or "0"
            text = elem.findtext(f"{ns}revision/{ns}text") or ""
            elem.clear()
            if namespace != "0" or elem.find(f"{ns}redirect") is not None:
                continue
            if text.lstrip()[:9].upper() == "#REDIRECT":
                continue
            yield title, text


def _remove_nested(text: str, pattern: re.Pattern) -> str:
    """Remove innermost-first matches until nothing changes (templates, tables nest)."""
    while True:
        new = pattern.sub("", text)
        if new == text:
            return text
        text = new


_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref\s*>", re.S | re.I)
_BLOCK_TAGS = re.compile(
    r"<(math|gallery|timeline|imagemap|score|syntaxhighlight|source|pre|chem|hiero|code|"
    r"table)\b[^>]*>.*?</\1\s*>",
    re.S | re.I,
)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXT_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]*\s*([^\]]*)\]")
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")


def _link(match: re.Match) -> str:
    inner = match.group(1)
    target, _, label = inner.partition("|")
    prefix, colon, _ = target.partition(":")
    p = prefix.strip().lower()
    if colon and (p in _DROP_LINK_PREFIXES or re.fullmatch(r"[a-z]{2,3}(-[a-z]+)?", p)):
        return ""  # files, categories, interlanguage links
    return (label or target).lstrip(":")


def wikitext_to_sections(text: str) -> list[tuple[str, list[str]]]:
    """Plain-text prose paragraphs grouped by top-level section (lead = "Introduction").

    A small, dependency-free wikitext stripper in the spirit of gensim's ``filter_wiki``:
    drops comments, references, templates, tables, files/categories, lists and indented
    lines; keeps link labels and paragraph text.
    """
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _BLOCK_TAGS.sub("", text)
    text = _remove_nested(text, _TEMPLATE)
    text = _remove_nested(text, _TABLE)
    while True:  # links nest inside file captions: resolve innermost first
        new = _LINK.sub(_link, text)
        if new == text:
            break
        text = new
    text = _EXT_LINK.sub(r"\1", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"<br\s*/?>", " ", text, flags=re.I)
    text = _TAG.sub("", text)
    text = html.unescape(text).replace("\xa0", " ")

    sections: list[tuple[str, list[str]]] = [("Introduction", [])]
    current: list[str] = []

    def flush() -> None:
        if current:
            para = _tidy(" ".join(current))
            if para:
                sections[-1][1].append(para)
            current.clear()

    for line in text.split("\n"):
        stripped = line.strip()
        heading = _HEADING.match(stripped)
        if heading:
            flush()
            if len(heading.group(1)) == 2:  # "== Section ==" starts a top-level section
                sections.append((heading.group(2).strip(), []))
            continue
        if not stripped or stripped[0] in "*#:;|!{}" or stripped.startswith("__"):
            flush()  # blank line, list, indentation, table or magic word: paragraph break
            continue
        current.append(stripped)
    flush()
    return [
        (h, paras) for h, paras in sections if paras and h.strip().lower() not in _SKIP_SECTIONS
    ]


def _tidy(text: str) -> str:
    """Mend what removed templates leave behind: "(; ; born 1879" -> "(born 1879", "(, x,)"."""
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\(\s*(?:[,;:]\s*)+", "(", text)
    text = re.sub(r"(?:\s*[,;:])+\s*\)", ")", text)
    text = _EMPTY_PARENS.sub("", text)
    text = re.sub(r"\s+([,.;:!?)])", r"\1", text)
    return text.strip()


_SENT_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(paragraph: str) -> list[str]:
    """Rule-based sentence split that does not break after common abbreviations/initials."""
    pieces: list[str] = []
    start = 0
    for m in _SENT_END.finditer(paragraph):
        candidate = paragraph[start : m.start()].rstrip()
        last = candidate.split()[-1] if candidate.split() else ""
        word = last.rstrip(".!?\"')]").lstrip("\"'([").lower()
        if last.endswith(".") and (
            word in _ABBREVIATIONS or re.fullmatch(r"[a-z]|(?:[a-z]\.)+[a-z]?", word)
        ):
            continue  # "Dr. Smith", "J. R. R. Tolkien", "U.S. Army"
        pieces.append(paragraph[start : m.end()].strip())
        start = m.end()
    tail = paragraph[start:].strip()
    if tail:
        pieces.append(tail)
    return pieces


def _good_sentence(s: str) -> bool:
    """A clean prose sentence: sane length, starts like a sentence, ends with punctuation, no
    markup left over."""
    n_words = len(s.split())
    return (
        MIN_SENTENCE_WORDS <= n_words <= MAX_SENTENCE_WORDS
        and (s[0].isupper() or s[0].isdigit() or s[0] in "\"'(")
        and s[-1] in ".!?\"')"
        and not re.search(r"[{}\[\]|<>=]|https?:|www\.|\s{2,}|\(\s|\s\)", s)
    )


def _passage(sentences: list[str], max_chars: int = MAX_PASSAGE_CHARS) -> str:
    """Leading sentences, as many as fit in ``max_chars`` (always at least one)."""
    out: list[str] = []
    for s in sentences:
        if out and len(" ".join([*out, s])) > max_chars:
            break
        out.append(s)
    return " ".join(out)


def load_articles(path: Path) -> list[Article]:
    """Articles with their prose split into clean sentences (paragraphs of bad sentences are
    cut at the first bad one). Disambiguation and list pages are skipped."""
    articles = []
    for title, text in iter_pages(path):
        if "(disambiguation)" in title or title.startswith("List of"):
            continue
        if re.search(r"\{\{\s*(disambig|dab|hndis|geodis)", text, re.I):
            continue
        article = Article(title)
        for heading, paragraphs in wikitext_to_sections(text):
            kept = []
            for para in paragraphs:
                sents = []
                for s in split_sentences(para):
                    if not _good_sentence(s):
                        break
                    sents.append(s)
                if sents:
                    kept.append(" ".join(sents))
            if kept:
                article.sections.append((heading, kept))
        if article.sections:
            articles.append(article)
    return articles


# --------------------------------------------------------------------------- construction


def _content_words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]{4,}", text.lower()))


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / max(1, len(a | b))


def build_triplets(articles: list[Article], seed: int = DEFAULT_SEED) -> list[dict]:
    """Inverse-Cloze-Task triplets with same-article, other-section hard negatives.

    The lead section ("Introduction") is left out of the triplets: it summarises the body, so
    a lead paragraph and a body paragraph often say the same thing (a false negative). For the
    same reason a negative whose content words overlap the query + positive by more than
    ``MAX_NEGATIVE_OVERLAP`` (Jaccard) is not used.
    """
    rng = random.Random(seed)
    out: list[dict] = []
    seen: set[str] = set()  # Wikipedia repeats some paragraphs: one triplet per query
    for ai, article in enumerate(articles):
        sections = [
            [split_sentences(p) for p in paras]
            for heading, paras in article.sections
            if heading != "Introduction"
        ]
        candidates = []
        for si, paras in enumerate(sections):
            for sents in paras:
                if len(sents) < 1 + MIN_POSITIVE_SENTENCES:
                    continue
                positive = _passage(sents[1:])
                if len(split_sentences(positive)) < MIN_POSITIVE_SENTENCES:
                    continue  # the first sentences alone are too long: skip
                candidates.append((si, sents[0], positive))
        rng.shuffle(candidates)
        # (section index, passage, its content words) of every body paragraph
        passages = [
            (sj, neg, _content_words(neg))
            for sj, paras in enumerate(sections)
            for neg in (_passage(p) for p in paras)
        ]
        used = 0
        for si, query, positive in candidates:
            if used == MAX_TRIPLETS_PER_ARTICLE:
                break
            if query in seen:
                continue
            seen.add(query)
            used += 1
            pos_words = _content_words(f"{query} {positive}")
            others = [
                neg
                for sj, neg, words in passages
                if sj != si and _jaccard(words, pos_words) <= MAX_NEGATIVE_OVERLAP
            ]
            if others:
                negative = rng.choice(others)
                neg_title = article.title
            else:  # no usable other section: a paragraph of another article
                other = articles[rng.choice([j for j in range(len(articles)) if j != ai])]
                paras = [p for _, ps in other.sections for p in ps]
                negative = _passage(split_sentences(rng.choice(paras)))
                neg_title = other.title
            out.append(
                {
                    "query": query,
                    "positive": positive,
                    "negative": negative,
                    "source": f"enwiki:{article.title}|neg:{neg_title}",
                }
            )
    rng.shuffle(out)
    return out


def build_sentences(articles: list[Article], seed: int = DEFAULT_SEED) -> list[str]:
    """All distinct clean sentences of the articles, shuffled with the seed."""
    seen: set[str] = set()
    out: list[str] = []
    for article in articles:
        for _, paras in article.sections:
            for para in paras:
                for s in split_sentences(para):
                    if s not in seen:
                        seen.add(s)
                        out.append(s)
    random.Random(seed).shuffle(out)
    return out


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temp file in the same folder, then rename over ``path`` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ensure_offline_default(
    cache_dir: str | Path | None = None, *, seed: int = DEFAULT_SEED, force: bool = False
) -> dict[str, Path]:
    """Build the offline default dataset once and return ``{"sup": jsonl, "unsup": txt}``.

    Files live in ``<cache_dir>/<BUILD_VERSION>-seed<seed>/`` (``cache_dir`` defaults to
    :func:`data_cache_dir`). A ``manifest.json``, written last, marks a finished build; every
    file is written atomically, so concurrent callers (DDP ranks) and killed builds are safe.
    """
    base = Path(cache_dir) if cache_dir is not None else data_cache_dir()
    target = base / f"{BUILD_VERSION}-seed{seed}"
    paths = {"sup": target / "sup_triplets.jsonl", "unsup": target / "unsup_sentences.txt"}
    manifest = target / "manifest.json"
    if not force and manifest.exists() and all(p.exists() for p in paths.values()):
        return paths

    source = find_source()
    log.info("Building the offline default dataset from %s into %s (once)", source, target)
    articles = load_articles(source)
    triplets = build_triplets(articles, seed)
    sentences = build_sentences(articles, seed)
    if not triplets or not sentences:
        raise RuntimeError(f"offline dataset build from {source} produced no examples")
    _write_atomic(paths["sup"], "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in triplets))
    _write_atomic(paths["unsup"], "".join(s + "\n" for s in sentences))
    info = {
        "version": BUILD_VERSION,
        "seed": seed,
        "source": str(source),
        "source_sha256": _sha256(source),
        "install": OFFLINE_PIP,
        "articles": len(articles),
        "triplets": len(triplets),
        "sentences": len(sentences),
        "licence": "Wikipedia text, CC BY-SA",
    }
    _write_atomic(manifest, json.dumps(info, indent=2) + "\n")
    log.info("Offline default dataset: %d triplets, %d sentences", len(triplets), len(sentences))
    return paths
