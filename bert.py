"""BERT: pre-training of deep bidirectional Transformers (masked LM + next sentence), then fine-tuning.

Paper: Jacob Devlin, Ming-Wei Chang, Kenton Lee, Kristina Toutanova, "BERT: Pre-training of Deep
Bidirectional Transformers for Language Understanding", 2018, arXiv:1810.04805. The official code is
google-research/bert (create_pretraining_data.py, modeling.py, run_pretraining.py, run_classifier.py).

What this file reproduces
  - Section 3 input representation: WordPiece (basic tokenisation: lower-casing and accent stripping
    when uncased, splitting on whitespace and punctuation, CJK characters as words; then greedy
    longest-match-first pieces with `##` continuations), `[CLS] A [SEP] B [SEP]` with segment ids 0 for
    [CLS], A and the first [SEP] and 1 for B and the last [SEP]; token + learned position (512) + segment
    embeddings, LayerNorm (eps 1e-12), dropout 0.1.
  - Section 3 model: post-LN Transformer encoder layers with exact (erf) GELU, padded keys masked out,
    truncated-normal init with std 0.02, the pooler (dense + tanh on [CLS]), the masked-LM head (dense +
    GELU + LayerNorm, then the decoder tied to the token embedding plus its own bias), the NSP head.
  - Section 3.1 pretraining data as create_pretraining_data.py builds it: documents of sentences,
    target length max_seq_length - 3 (shorter with probability short_seq_prob), a random A/B split of the
    accumulated segments, B from another document half the time (unused segments put back), truncation of
    the longer side from the front or back at random; exactly min(max_predictions_per_seq,
    max(1, round(0.15 n))) masked positions per sequence, never [CLS]/[SEP]/[PAD], 80% [MASK], 10% a
    random token, 10% unchanged. Whole-word masking, static masking with dupe_factor copies and dynamic
    masking (re-masked at every draw) are options.
  - Appendix A.2 pretraining: loss = masked-LM + NSP cross-entropy, AdamW lr 1e-4, betas (0.9, 0.999),
    eps 1e-6, weight decay 0.01 (not on LayerNorms and biases), linear warmup over 10,000 steps then linear
    decay to 0, clipping at 1.0; 90% of the steps at length 128 and the rest at 512 (`--two_phase`).
  - Section 4.1 / appendix A.3 fine-tuning: sentence and sentence-pair classification from the pooled
    [CLS] output with dropout, lr in 2e-5..5e-5, batch 32, 3 epochs, 10% warmup then linear decay.

Run it
  python bert.py                                   # main job: small preset, pretrain then fine-tune
  python bert.py pretrain --data wikitext2 --out_dir out/wt2
  python bert.py finetune --init_from out/wt2/ckpt.pt --finetune_data sst2 --out_dir out/sst2
  python bert.py finetune --init_from hf:path/to/bert-base-uncased   # Hugging Face BERT weights
  torchrun --nproc_per_node=2 bert.py ...              # data parallel (any stage, or the main job)

Stages and their hyperparameters: `pretrain` uses the plain fields (lr, batch_size, warmup_steps,
total_steps, max_seq_length); `finetune` uses the `finetune_*` fields and max_seq_length. The main job
runs `pretrain` into out_dir/pretrain, then `finetune` into out_dir/finetune from that checkpoint.
Data: `--data wikitext2` (articles split at their ` = Title = ` headings are the documents; paragraphs
are split into sentences after standalone . ! ?; WikiText's ` @-@ ` markup is undone and `<unk>` becomes
[UNK]), a text file or folder (train.txt, valid.txt) with one sentence per line and a blank line between
documents, or in WikiText's layout (the last tenth of a single file's documents is validation; at least
4 documents), or `builtin` (the 79 Python documentation topics are documents, the last 8 validation).
`--finetune_data sst2`, `builtin` (synthetic), or a folder with train.tsv and dev.tsv as
`label<TAB>sentence[<TAB>second sentence]`.

Deliberate deviations from the paper and the official code
  - The WordPiece vocabulary is learned with BPE-style merges written in WordPiece format (as Hugging
    Face's WordPieceTrainer does); Google never released its likelihood-based trainer. A trained
    vocabulary puts [PAD] [UNK] [CLS] [SEP] [MASK] at ids 0-4; a loaded vocab.txt keeps its own ids.
    Words longer than 100 characters become [UNK] (Hugging Face's limit; Google's code says 200).
  - A NotNext B comes from a uniformly drawn *other* document (Google tries 10 random draws and can end
    up with A's own document). Random replacement tokens are never special tokens (Google draws from
    the whole vocabulary, [PAD] and [CLS] included). As in Google's code, the shortened target length is
    drawn once per document.
  - Whole-word masking draws 80/10/10 once per word; Google's draws it per piece (issue #910), and its
    word groups can span a [SEP]; ours never do.
  - Static masking: epoch e uses copy e mod dupe_factor (each copy its own instances and masks), where
    Google writes all copies into one shuffled file: the same construction, visited copy by copy.
  - Batches are padded to their longest sequence, not to max_seq_length; the MLM head runs only at the
    masked positions (as Google's gather_indexes). Padded keys get -inf, not -10000.
  - torch's AdamW has Adam's bias correction; Google's AdamWeightDecayOptimizer has none.
  - Data: BooksCorpus and English Wikipedia (3.3B words) are not redistributable at this scale; the
    defaults are WikiText-2 and SST-2, and offline the Python documentation and a synthetic task.
  - `small` and `tiny` are narrower and train for far fewer steps; their warmup is a few percent of
    their run, as the paper's 10,000 of 1,000,000 steps would be a handful of steps.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import hashlib
import heapq
import json
import math
import os
import random
import re
import sys
import time
import unicodedata
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# -----------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    # model (section 3: BERT-Base, L=12, H=768, A=12, feed-forward 4H; released vocab 30,522)
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_ff: int = 3072
    max_position: int = 512  # learned position embeddings
    type_vocab_size: int = 2  # segments A and B
    vocab_size: int = 30522  # embedding rows; 0 = the tokenizer's size, larger leaves rows unused
    dropout: float = 0.1  # embeddings, attention probabilities and residual branches (appendix A.2)
    gelu: str = "exact"  # exact (erf, the paper's release) | tanh (Google's code since Feb 2019)
    # tokenizer and pretraining data (section 3.1, create_pretraining_data.py flags)
    data: str = "wikitext2"  # wikitext2 | builtin | path to a text file or folder
    lower_case: bool = True  # uncased model: lower-case and strip accents
    wordpiece_vocab_size: int = 30522
    max_seq_length: int = 128
    max_predictions_per_seq: int = 20  # at max_seq_length (scaled with the length in phase two)
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    dupe_factor: int = 10  # static masking: copies of the data with different masks
    whole_word_mask: bool = False
    dynamic_masking: bool = False  # re-mask at every draw (RoBERTa) instead of dupe_factor copies
    two_phase: bool = True  # appendix A.2: 90% of the steps at max_seq_length, the rest at max_position
    # pretraining (appendix A.2): batch 256, 1M steps, Adam lr 1e-4, 10k warmup steps, linear decay
    batch_size: int = 256
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 10_000
    total_steps: int = 1_000_000
    weight_decay: float = 0.01  # not on LayerNorms and biases
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-6  # optimization.py
    grad_clip: float = 1.0
    # fine-tuning (section 4.1, appendix A.3; run_classifier.py)
    finetune_data: str = "sst2"  # sst2 | builtin | folder with train.tsv and dev.tsv
    finetune_lr: float = 2e-5  # the paper picks from 5e-5, 3e-5, 2e-5
    finetune_batch_size: int = 32
    finetune_epochs: int = 3
    finetune_warmup: float = 0.1  # fraction of the fine-tuning steps
    clf_dropout: float = 0.1
    # run control
    out_dir: str = "out/bert"
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    compile: bool = False
    seed: int = 1337
    eval_interval: int = 10_000
    eval_batches: int = 20  # batches of the validation split per evaluation; 0 = the whole split
    log_interval: int = 100
    max_steps: int = 0  # stop this run early at this step (0 = run the whole schedule)
    resume: bool = False
    init_from: str = ""  # a checkpoint (ckpt.pt), or hf:DIR for Hugging Face BERT weights


PRESETS = {
    "paper": Config(),
    "small": Config(n_layer=4, n_head=4, d_model=128, d_ff=512, vocab_size=0, wordpiece_vocab_size=8000,
                    max_seq_length=128, dupe_factor=5, two_phase=False, batch_size=32, lr=5e-4,
                    warmup_steps=50, total_steps=1000, eval_interval=250, eval_batches=20, log_interval=50,
                    finetune_lr=1e-4, finetune_epochs=1),
    "tiny": Config(n_layer=2, n_head=2, d_model=32, d_ff=64, max_position=128, vocab_size=0,
                   wordpiece_vocab_size=300, max_seq_length=64, max_predictions_per_seq=10, dupe_factor=2,
                   two_phase=False, batch_size=8, lr=1e-3, warmup_steps=2, total_steps=20, eval_interval=20,
                   eval_batches=2, log_interval=5, finetune_lr=1e-3, finetune_batch_size=32,
                   finetune_epochs=1),
}
ARCH_FIELDS = ("n_layer", "n_head", "d_model", "d_ff", "max_position", "type_vocab_size", "vocab_size", "gelu")
STAGES = ("pretrain", "finetune")


class UserError(Exception):
    """Bad input: main() prints it as one line `error: ...` and exits with status 2."""


def validate(cfg: Config) -> None:
    for name in ("n_layer", "n_head", "d_model", "d_ff", "max_position", "type_vocab_size", "batch_size",
                 "grad_accum", "total_steps", "max_predictions_per_seq", "dupe_factor", "wordpiece_vocab_size",
                 "finetune_batch_size", "finetune_epochs", "eval_interval", "log_interval"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("vocab_size", "warmup_steps", "max_steps", "eval_batches", "weight_decay", "grad_clip"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must not be negative, got {getattr(cfg, name)}")
    if cfg.d_model % cfg.n_head:
        raise UserError(f"--n_head {cfg.n_head} must divide --d_model {cfg.d_model}")
    for name in ("dropout", "clf_dropout"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise UserError(f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    if not 0.0 < cfg.masked_lm_prob < 1.0:
        raise UserError(f"--masked_lm_prob must be in (0, 1), got {cfg.masked_lm_prob}")
    for name in ("short_seq_prob", "finetune_warmup"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise UserError(f"--{name} must be in [0, 1], got {getattr(cfg, name)}")
    if not 5 <= cfg.max_seq_length <= cfg.max_position:
        raise UserError(f"--max_seq_length {cfg.max_seq_length} must be at least 5 ([CLS] A [SEP] B [SEP]) "
                        f"and at most the model's context --max_position {cfg.max_position}")
    if not (cfg.lr > 0 and cfg.finetune_lr > 0 and cfg.adam_eps > 0):
        raise UserError("--lr, --finetune_lr and --adam_eps must be positive")
    if cfg.gelu not in ("exact", "tanh"):
        raise UserError(f"--gelu must be exact or tanh, not {cfg.gelu!r}")
    if cfg.device not in ("auto", "cpu", "cuda", "mps") and not cfg.device.startswith("cuda:"):
        raise UserError(f"--device must be auto, cpu, cuda or mps, not {cfg.device!r}")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"--dtype must be auto, float32, bfloat16 or float16, not {cfg.dtype!r}")


# -----------------------------------------------------------------------------------------------------
# Tokenizer: BERT's basic tokenisation, then WordPiece (section 3, tokenization.py)

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0-4 in a trained vocabulary
SPECIAL_SPLIT = re.compile("(" + "|".join(re.escape(s) for s in SPECIALS) + ")")
MAX_WORD_CHARS = 100  # longer words are [UNK] (Hugging Face; Google: 200)
CJK = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
       (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
ASCII_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
ASCII_WORDS = re.compile(r"[A-Za-z0-9]+|[^\sA-Za-z0-9]")  # every other printable ASCII char is punctuation


def basic_tokenize(text: str, lower: bool) -> list[str]:
    """Drop control characters, map whitespace to spaces, put spaces around CJK characters, strip accents
    and lower-case (uncased), then split on whitespace and around every punctuation character."""
    if text.isascii():  # the fast path for most text; the same result as the general one
        text = ASCII_CONTROL.sub("", text)
        return ASCII_WORDS.findall(text.lower() if lower else text)
    chars = []
    for c in text:
        if c == "\ufffd" or (unicodedata.category(c)[0] == "C" and c not in "\t\n\r"):
            continue
        if c.isspace():
            chars.append(" ")
        elif any(lo <= ord(c) <= hi for lo, hi in CJK):
            chars.append(f" {c} ")
        else:
            chars.append(c)
    text = "".join(chars)
    if lower:
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        text = "".join(c.lower() for c in text)  # per character, as Hugging Face's normaliser
    words = []
    for word in text.split():
        start = 0
        for i, c in enumerate(word):
            if unicodedata.category(c)[0] == "P" or (c.isascii() and not c.isalnum()):
                words += [word[start:i], c] if i > start else [c]
                start = i + 1
        if start < len(word):
            words.append(word[start:])
    return words


class WordPiece:
    """Greedy longest-match-first WordPiece over basic tokens; `##` marks a piece inside a word. The special
    tokens are matched in the raw text first, as Hugging Face's BertTokenizer does."""

    def __init__(self, vocab: list[str], lower: bool = True):
        self.vocab, self.lower = list(vocab), lower
        self.ids = {t: i for i, t in enumerate(self.vocab)}
        missing = [s for s in SPECIALS if s not in self.ids]
        if missing:
            raise UserError(f"the vocabulary has no {', '.join(missing)}; BERT needs {', '.join(SPECIALS)}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (self.ids[s] for s in SPECIALS)
        self.continuation = [t.startswith("##") for t in self.vocab]
        special = {self.ids[s] for s in SPECIALS}
        self.normal_ids = [i for i in range(len(self.vocab)) if i not in special]  # for random replacement
        self.cache: dict[str, list[int]] = {}

    def __len__(self):
        return len(self.vocab)

    @classmethod
    def train(cls, texts, vocab_size: int, lower: bool = True) -> "WordPiece":
        """BPE-style merges emitted as WordPiece: a word starts as `w ##o ##r ##d`, and merging (a, ##b)
        gives `ab` (or `##ab`). Pairs are counted over word types weighted by frequency and updated
        incrementally after each merge; a heap with lazy deletion finds the most frequent pair."""
        words = Counter(w for t in texts for chunk in SPECIAL_SPLIT.split(t)[::2]
                        for w in basic_tokenize(chunk, lower) if len(w) <= MAX_WORD_CHARS)
        alphabet = sorted({w[0] for w in words} | {"##" + c for w in words for c in w[1:]})
        vocab = list(SPECIALS) + alphabet
        id_of = {t: i for i, t in enumerate(vocab)}
        seqs = [[id_of[w[0]]] + [id_of["##" + c] for c in w[1:]] for w in words]
        freqs = list(words.values())
        pair_count: Counter = Counter()
        where: dict[tuple[int, int], set[int]] = {}
        for i, (s, f) in enumerate(zip(seqs, freqs)):
            for pair in zip(s, s[1:]):
                pair_count[pair] += f
                where.setdefault(pair, set()).add(i)
        heap = [(-c, p) for p, c in pair_count.items()]
        heapq.heapify(heap)
        while len(vocab) < vocab_size and heap:
            neg, pair = heapq.heappop(heap)
            if pair_count.get(pair, 0) != -neg:
                continue  # a stale heap entry: its count changed since it was pushed
            merged = vocab[pair[0]] + vocab[pair[1]][2:]
            if merged not in id_of:  # two different pairs can spell the same piece
                id_of[merged] = len(vocab)
                vocab.append(merged)
            new, changed = id_of[merged], set()
            for i in where.pop(pair):
                s, f = seqs[i], freqs[i]
                for p in zip(s, s[1:]):  # take this word's pairs out, merge, put the new ones in
                    pair_count[p] -= f
                    changed.add(p)
                out, j = [], 0
                while j < len(s):
                    if j + 1 < len(s) and (s[j], s[j + 1]) == pair:
                        out.append(new)
                        j += 2
                    else:
                        out.append(s[j])
                        j += 1
                seqs[i] = out
                for p in zip(out, out[1:]):
                    pair_count[p] += f
                    where.setdefault(p, set()).add(i)
                    changed.add(p)
            del pair_count[pair]
            for p in changed - {pair}:
                if pair_count[p] > 0:
                    heapq.heappush(heap, (-pair_count[p], p))
        return cls(vocab, lower)

    def encode_word(self, word: str) -> list[int]:
        ids = self.cache.get(word)
        if ids is None:
            ids, start = [], 0
            while start < len(word) and len(word) <= MAX_WORD_CHARS:
                for end in range(len(word), start, -1):  # the longest piece in the vocabulary
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    if piece in self.ids:
                        ids.append(self.ids[piece])
                        start = end
                        break
                else:
                    break  # no piece fits: the whole word is unknown
            if start < len(word):
                ids = [self.unk_id]
            self.cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        ids = []
        for i, chunk in enumerate(SPECIAL_SPLIT.split(text)):  # odd chunks are special tokens
            if i % 2:
                ids.append(self.ids[chunk])
            else:
                ids += [t for w in basic_tokenize(chunk, self.lower) for t in self.encode_word(w)]
        return ids

    def decode(self, ids) -> str:
        return " ".join(self.vocab[i] for i in ids).replace(" ##", "")

    def save(self, path: Path) -> None:
        path.write_text("".join(t + "\n" for t in self.vocab), encoding="utf-8")

    @classmethod
    def load(cls, path: Path, lower: bool = True) -> "WordPiece":
        """A standard vocab.txt: one token per line, the line number is its id."""
        lines = read_text(path).split("\n")
        return cls(lines[:-1] if lines[-1] == "" else lines, lower)

    def state(self) -> dict:
        return {"vocab": self.vocab, "lower": self.lower}


def tokenizer_from_state(state: dict) -> WordPiece:
    return WordPiece(state["vocab"], state["lower"])


# -----------------------------------------------------------------------------------------------------
# Data: named datasets downloaded once into a cache and checked, local files, and an offline fallback

DATASETS = {  # name -> {file: (pinned URL, sha256)}; ../shared/data/URLS.md lists where these come from
    "wikitext2": {f"{s}.txt": (
        "https://raw.githubusercontent.com/pytorch/examples/77f55b912142e11fcfdf5b530231fb9c52f181e8/"
        f"word_language_model/data/wikitext-2/{s}.txt", h) for s, h in (
        ("train", "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f"),
        ("valid", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"))},
    "sst2": {f"{s}.tsv": (
        "https://raw.githubusercontent.com/eyalbd2/Reproducing-AutoPrompt/6288fb5bec9c572f2492875ae0111df5b6daed11/"
        f"glue_data/SST-2/{f}.tsv", h) for s, f, h in (
        ("train", "train_full", "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1"),
        ("dev", "dev", "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0"))},
}

# Copied from gpt.py: log0
def log0(*args):
    """Print on rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, flush=True)


# Copied from gpt.py: download
def download(name: str, files: dict) -> Path | None:
    """Fetch a named dataset into the cache (once), checking sha256; None when the network is absent."""
    root = Path(os.environ.get("NLP_LINEAGE_CACHE") or
                Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nlp-lineage") / name
    for fname, (url, sha) in files.items():
        path = root / fname
        if path.exists():
            continue
        try:
            with urllib.request.urlopen(url, timeout=30) as r:
                data = r.read()
        except OSError as e:
            log0(f"could not download {name} ({e.__class__.__name__}: {e})")
            return None
        if sha and hashlib.sha256(data).hexdigest() != sha:
            raise UserError(f"download of {url} does not match its known sha256; not using it")
        root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return root


# Copied from gpt.py: read_text
def read_text(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    if not text.strip():
        raise UserError(f"data file {path} is empty")
    return text


# Copied from gpt.py: builtin_text
def builtin_text() -> list[str]:
    """The offline fallback corpus: the 79 Python documentation topics shipped in pydoc_data."""
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)]


WIKI_HEADING = re.compile(r"^ = [^=].* = $")  # a level-1 heading ` = Title = ` starts an article
WIKI_MARKUP = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), ("<unk>", "[UNK]"))


def wikitext_documents(text: str) -> list[list[str]]:
    """Articles (split at their level-1 headings) of sentences; section headings are dropped, paragraphs
    are split after standalone `.`, `!` and `?` tokens (WikiText spaces its punctuation; abbreviations
    keep theirs attached)."""
    docs: list[list[str]] = []
    for line in text.splitlines():
        if WIKI_HEADING.match(line):
            docs.append([])
        elif line.strip() and not line.startswith(" = ") and docs:
            for old, new in WIKI_MARKUP:
                line = line.replace(old, new)
            docs[-1] += [s.strip() for s in re.split(r"(?<= [.!?]) ", line.strip()) if s.strip()]
    return [d for d in docs if d]


def text_documents(text: str) -> list[list[str]]:
    """create_pretraining_data.py's input: one sentence per line, a blank line between documents."""
    return [[s.strip() for s in block.splitlines() if s.strip()]
            for block in re.split(r"\n\s*\n", text) if block.strip()]


def prose_documents(texts: list[str]) -> list[list[str]]:
    """Plain prose (the built-in topics): paragraphs at blank lines, sentences after . ! ? and a space."""
    return [[s for p in re.split(r"\n\s*\n", t) for s in re.split(r"(?<=[.!?])\s+", " ".join(p.split())) if s]
            for t in texts]


def load_documents(data: str) -> tuple[str, list, list]:
    """(name, train documents, validation documents); a document is a list of sentences."""
    if data == "wikitext2":
        root = download(data, DATASETS[data])
        if root is None:
            log0("offline: falling back to the built-in corpus (Python documentation) instead of wikitext2")
            data = "builtin"
        else:
            return data, wikitext_documents(read_text(root / "train.txt")), \
                wikitext_documents(read_text(root / "valid.txt"))
    if data == "builtin":
        docs = prose_documents(builtin_text())
        return "builtin", docs[:-8], docs[-8:]
    path = Path(data)
    if not path.exists():
        raise UserError(f"unknown dataset {data!r}: use wikitext2, builtin or a path to text")

    def parse(text):
        wiki = any(WIKI_HEADING.match(line) for line in text.splitlines()[:5])
        return wikitext_documents(text) if wiki else text_documents(text)

    if path.is_dir():
        if not ((path / "train.txt").is_file() and (path / "valid.txt").is_file()):
            raise UserError(f"folder {path} needs train.txt and valid.txt")
        return path.name, parse(read_text(path / "train.txt")), parse(read_text(path / "valid.txt"))
    docs = parse(read_text(path))
    n_val = max(2, len(docs) // 10)
    if len(docs) < n_val + 2:
        raise UserError(f"{path} holds {len(docs)} documents; next-sentence prediction needs at least 4 "
                        "(separate documents with a blank line)")
    return path.name, docs[:-n_val], docs[-n_val:]


def tokenize_documents(docs, tok: WordPiece) -> list[list[list[int]]]:
    """Documents of sentences of token ids; empty sentences and documents are dropped."""
    out = [[ids for ids in map(tok.encode, doc) if ids] for doc in docs]
    return [d for d in out if d]


def document_pairs(docs, d: int, seq_len: int, short_seq_prob: float, rng: random.Random):
    """(tokens A, tokens B, is_random_next) from document d, as create_instances_from_document."""
    doc, max_tokens = docs[d], seq_len - 3  # room for [CLS], [SEP], [SEP]
    target = rng.randint(2, max_tokens) if rng.random() < short_seq_prob else max_tokens
    chunk, length, i = [], 0, 0
    while i < len(doc):
        chunk.append(doc[i])
        length += len(doc[i])
        if i == len(doc) - 1 or length >= target:
            a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
            a = [t for s in chunk[:a_end] for t in s]
            if len(chunk) == 1 or rng.random() < 0.5:  # NotNext: B from another document
                is_random, b = True, []
                other = rng.randrange(len(docs) - 1)
                other_doc = docs[other + (other >= d)]
                for s in other_doc[rng.randrange(len(other_doc)):]:
                    b += s
                    if len(b) >= target - len(a):
                        break
                i -= len(chunk) - a_end  # put the unused segments back
            else:
                is_random, b = False, [t for s in chunk[a_end:] for t in s]
            while len(a) + len(b) > max_tokens:  # truncate the longer side, front or back at random
                longer = a if len(a) > len(b) else b
                del longer[0 if rng.random() < 0.5 else -1]
            yield a, b, is_random
            chunk, length = [], 0
        i += 1


def mask_tokens(ids: list[int], tok: WordPiece, rng: random.Random, masked_lm_prob: float,
                max_predictions: int, whole_word: bool = False) -> tuple[list[int], list[int], list[int]]:
    """create_masked_lm_predictions: (masked ids, sorted positions, original ids there). Exactly
    min(max_predictions, max(1, round(masked_lm_prob * n))) positions, never [CLS]/[SEP]/[PAD]; per
    candidate (a piece, or with whole_word all pieces of a word) 80% [MASK], 10% random, 10% unchanged."""
    specials = (tok.cls_id, tok.sep_id, tok.pad_id)
    candidates: list[list[int]] = []
    for i, t in enumerate(ids):
        if t in specials:
            continue
        if whole_word and candidates and tok.continuation[t] and candidates[-1][-1] == i - 1:
            candidates[-1].append(i)
        else:
            candidates.append([i])
    rng.shuffle(candidates)
    n_predict = min(max_predictions, max(1, round(len(ids) * masked_lm_prob)))
    out, chosen = list(ids), []
    for word in candidates:
        if len(chosen) >= n_predict:
            break
        if len(chosen) + len(word) > n_predict:
            continue  # a whole word that would overshoot: try a shorter one
        r = rng.random()
        for i in word:
            if r < 0.8:
                out[i] = tok.mask_id
            elif r < 0.9:
                out[i] = tok.normal_ids[rng.randrange(len(tok.normal_ids))]
        chosen += word
    chosen.sort()
    return out, chosen, [ids[i] for i in chosen]


def predictions_per_seq(cfg: Config, seq_len: int) -> int:
    """max_predictions_per_seq at max_seq_length, scaled with the length (20 at 128 -> 80 at 512)."""
    return round(cfg.max_predictions_per_seq * seq_len / cfg.max_seq_length)


def create_instances(docs, tok: WordPiece, cfg: Config, seq_len: int, rng: random.Random, static: bool):
    """One pass over the documents: instances (len(A), is_random_next, ids, positions, labels); with
    static masking the ids are masked here, otherwise positions and labels are None."""
    instances = []
    for d in range(len(docs)):
        for a, b, is_random in document_pairs(docs, d, seq_len, cfg.short_seq_prob, rng):
            ids = [tok.cls_id, *a, tok.sep_id, *b, tok.sep_id]
            if static:
                instances.append((len(a), is_random, *mask_tokens(
                    ids, tok, rng, cfg.masked_lm_prob, predictions_per_seq(cfg, seq_len), cfg.whole_word_mask)))
            else:
                instances.append((len(a), is_random, ids, None, None))
    return instances


def collate_pretraining(instances, tok: WordPiece, cfg: Config, seq_len: int, rng=None) -> dict:
    """Right-padded batch: input_ids, token_type_ids, attention_mask (B, T); mlm_labels (B, T), -100 where
    nothing is predicted; nsp_labels (B,), 1 = B is a random sentence. rng: dynamic masking."""
    T = max(len(x[2]) for x in instances)
    batch = {"input_ids": torch.full((len(instances), T), tok.pad_id), "token_type_ids": torch.zeros(
        len(instances), T, dtype=torch.long), "attention_mask": torch.zeros(len(instances), T, dtype=torch.bool),
        "mlm_labels": torch.full((len(instances), T), -100), "nsp_labels": torch.tensor([int(x[1]) for x in instances])}
    for r, (n_a, _, ids, positions, labels) in enumerate(instances):
        if positions is None:
            ids, positions, labels = mask_tokens(ids, tok, rng, cfg.masked_lm_prob,
                                                 predictions_per_seq(cfg, seq_len), cfg.whole_word_mask)
        batch["input_ids"][r, :len(ids)] = torch.tensor(ids)
        batch["token_type_ids"][r, n_a + 2:len(ids)] = 1  # B and the last [SEP]
        batch["attention_mask"][r, :len(ids)] = True
        batch["mlm_labels"][r, positions] = torch.tensor(labels)
    return batch


class PretrainingSampler:
    """Shuffled batches of pretraining instances, a new permutation per epoch. Static masking: epoch e
    draws copy e mod dupe_factor (built from its own seed); dynamic: copy 0, masked anew at every draw.
    Two-phase: after 90% of the steps, instances of length max_position. Under DDP each rank takes its
    slice of every batch. The data position saved in checkpoints is (epoch, index, batches drawn)."""

    def __init__(self, docs, tok: WordPiece, cfg: Config, total_steps: int, rank=0, world=1):
        self.docs, self.tok, self.cfg, self.rank, self.world = docs, tok, cfg, rank, world
        self.switch = int(0.9 * total_steps) * cfg.grad_accum if cfg.two_phase else -1
        self.epoch = self.index = self.drawn = 0
        self.key, self.instances = None, []

    def __next__(self) -> dict:
        cfg, per_batch = self.cfg, self.cfg.batch_size * self.world
        if self.drawn == self.switch:  # phase two starts a fresh pass
            self.epoch, self.index = 0, 0
        seq_len = cfg.max_position if 0 <= self.switch <= self.drawn else cfg.max_seq_length
        while True:
            key = (0 if cfg.dynamic_masking else self.epoch % cfg.dupe_factor, seq_len)
            if key != self.key:
                self.key, self.instances = key, create_instances(
                    self.docs, self.tok, cfg, seq_len, random.Random(f"{cfg.seed}-{key}"), not cfg.dynamic_masking)
                if len(self.instances) < per_batch:
                    raise UserError(f"the training data gives {len(self.instances)} instances, fewer than one "
                                    f"batch of {per_batch}; use more data or a smaller --batch_size")
            if self.index < len(self.instances) // per_batch:
                break
            self.epoch, self.index = self.epoch + 1, 0
        order = torch.randperm(len(self.instances), generator=torch.Generator().manual_seed(cfg.seed + self.epoch))
        start = (self.index * self.world + self.rank) * cfg.batch_size
        rng = random.Random(f"{cfg.seed}-{self.rank}-{self.drawn}") if cfg.dynamic_masking else None
        self.index, self.drawn = self.index + 1, self.drawn + 1
        return collate_pretraining([self.instances[i] for i in order[start:start + cfg.batch_size].tolist()],
                                   self.tok, cfg, seq_len, rng)

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index, "drawn": self.drawn}

    def load_state_dict(self, state):
        self.epoch, self.index, self.drawn = state["epoch"], state["index"], state["drawn"]


# -----------------------------------------------------------------------------------------------------
# Model (section 3; modeling.py)


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention; padded keys are masked out."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.attn_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, key_mask, need_weights=False):
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_head)
        keep = rearrange(key_mask, "b s -> b 1 1 s")  # True where the key is a real token
        if need_weights:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, T, S)
            att = att.masked_fill(~keep, float("-inf")).softmax(dim=-1)
            y = self.attn_drop(att) @ v
        else:
            att = None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep,
                                               dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj(rearrange(y, "b h t d -> b t (h d)")), att


class Layer(nn.Module):
    """Post-LN encoder layer: h = LN(x + Drop(Attn(x))); out = LN(h + Drop(W2 GELU(W1 h)))."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=1e-12)
        self.fc1 = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc2 = nn.Linear(cfg.d_ff, cfg.d_model)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=1e-12)
        self.drop = nn.Dropout(cfg.dropout)
        self.approximate = "tanh" if cfg.gelu == "tanh" else "none"

    def forward(self, x, key_mask, need_weights=False):
        a, att = self.attn(x, key_mask, need_weights)
        x = self.ln_1(x + self.drop(a))
        x = self.ln_2(x + self.drop(self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))))
        return x, att


class Bert(nn.Module):
    """Embeddings, the encoder and the pooler: (hidden states (B, T, C), pooled [CLS] (B, C))."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_position, cfg.d_model)
        self.seg = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.ln = nn.LayerNorm(cfg.d_model, eps=1e-12)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layer))
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, ids, segments=None, mask=None, need_weights=False):
        """ids, segments (B, T); mask (B, T) True at real tokens (default: all)."""
        B, T = ids.shape
        if T > self.cfg.max_position:
            raise UserError(f"sequence of {T} tokens is longer than the model's {self.cfg.max_position} "
                            "positions; use a shorter --max_seq_length")
        segments = torch.zeros_like(ids) if segments is None else segments
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
        pos = torch.arange(T, device=ids.device)
        x = self.drop(self.ln(self.tok(ids) + self.pos(pos) + self.seg(segments)))  # (B, T, C)
        atts = []
        for layer in self.layers:
            x, att = layer(x, mask, need_weights)
            atts.append(att)
        pooled = torch.tanh(self.pooler(x[:, 0]))  # the [CLS] state, dense + tanh (B, C)
        return (x, pooled, atts) if need_weights else (x, pooled)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs: 6N for the matmul weights (embedding lookups are none) plus 12 L T C for
        attention (PaLM appendix B)."""
        n = sum(p.numel() for m in (self.layers, self.pooler) for p in m.parameters())
        return 6 * n + 12 * self.cfg.n_layer * seq_len * self.cfg.d_model


def init_weights(m: nn.Module) -> None:
    """Truncated normal, std 0.02, cut at two standard deviations (TF's truncated_normal); zero biases."""
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.trunc_normal_(m.weight, std=0.02, a=-0.04, b=0.04)
    if isinstance(m, nn.Linear) and m.bias is not None:
        nn.init.zeros_(m.bias)


class BertForPreTraining(nn.Module):
    """Bert plus the masked-LM head (decoder tied to the token embedding) and the NSP head."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.bert = Bert(cfg)
        self.mlm_dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlm_ln = nn.LayerNorm(cfg.d_model, eps=1e-12)
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.nsp = nn.Linear(cfg.d_model, 2)
        self.approximate = "tanh" if cfg.gelu == "tanh" else "none"
        self.apply(init_weights)

    def forward(self, ids, segments=None, mask=None, masked=None):
        """(MLM logits, NSP logits (B, 2)). MLM logits are (B, T, V), or (N, V) at the N positions where
        `masked` (B, T) is True."""
        h, pooled = self.bert(ids, segments, mask)
        if masked is not None:
            h = h[masked]
        z = self.mlm_ln(F.gelu(self.mlm_dense(h), approximate=self.approximate))
        return z @ self.bert.tok.weight.T + self.mlm_bias, self.nsp(pooled)

    def flops_per_token(self, seq_len: int) -> float:
        """The encoder's, plus the MLM head and tied decoder at the masked fraction of the positions."""
        c = self.cfg
        return self.bert.flops_per_token(seq_len) + 6 * c.masked_lm_prob * (c.d_model + c.vocab_size) * c.d_model


def build_model(cfg: Config) -> BertForPreTraining:
    if cfg.vocab_size <= 0:
        raise UserError("--vocab_size must be positive (it is set from the tokenizer when data is loaded)")
    return BertForPreTraining(cfg)


# -----------------------------------------------------------------------------------------------------
# Objective: masked-LM cross-entropy over the masked positions + NSP cross-entropy, fp32 under autocast


def pretrain_losses(model, batch: dict):
    """(MLM loss, NSP loss, MLM logits (N, V), MLM targets (N,), NSP logits (B, 2))."""
    masked = batch["mlm_labels"] != -100
    mlm_logits, nsp_logits = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], masked)
    targets = batch["mlm_labels"][masked]
    mlm = F.cross_entropy(mlm_logits.float(), targets)
    nsp = F.cross_entropy(nsp_logits.float(), batch["nsp_labels"])
    return mlm, nsp, mlm_logits, targets, nsp_logits


def pretrain_loss(model, batch: dict) -> torch.Tensor:
    mlm, nsp, *_ = pretrain_losses(model, batch)
    return mlm + nsp


# -----------------------------------------------------------------------------------------------------
# Downstream: sentence (pair) classification from the pooled [CLS] output (section 4.1)


class BertClassifier(nn.Module):
    def __init__(self, bert: Bert, n_classes: int, clf_dropout: float):
        super().__init__()
        self.bert = bert
        self.drop = nn.Dropout(clf_dropout)
        self.head = nn.Linear(bert.cfg.d_model, n_classes)
        init_weights(self.head)

    def forward(self, ids, segments, mask):
        return self.head(self.drop(self.bert(ids, segments, mask)[1]))  # (B, n_classes)


# Copied from gpt.py: read_tsv
def read_tsv(path: Path, header: bool) -> list[tuple[str, str]]:
    """Rows of (label, text). GLUE layout (header: `sentence<TAB>label`) or `label<TAB>text` (no header;
    the text may contain tabs)."""
    rows = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip() or (header and n == 1):
            continue
        if header:
            text, _, label = line.rpartition("\t")
        else:
            label, _, text = line.partition("\t")
        if not text.strip() or not label.strip():
            raise UserError(f"{path}:{n}: expected {'sentence<TAB>label' if header else 'label<TAB>text'}")
        rows.append((label.strip(), text))
    if not rows:
        raise UserError(f"{path} holds no examples")
    return rows


# Copied from gpt.py: synthetic_sentiment
def synthetic_sentiment(n: int, seed: int) -> list[tuple[str, str]]:
    """A small generated sentiment task: short reviews whose label (1 positive, 0 negative) is the
    polarity of their one sentiment word among neutral filler. Deterministic in seed."""
    rng = random.Random(seed)
    good = ["good", "great", "wonderful", "moving", "funny", "brilliant", "charming", "sharp"]
    bad = ["bad", "dull", "awful", "boring", "clumsy", "tedious", "weak", "messy"]
    things = ["film", "plot", "cast", "script", "ending", "score", "story", "director"]
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        rows.append((str(label), f"the {rng.choice(things)} was {rng.choice(good if label else bad)} "
                                 f"and the {rng.choice(things)} {rng.choice(['was', 'felt', 'seemed'])} "
                                 f"{rng.choice(['long', 'short', 'new', 'old'])}"))
    return rows


# Copied from gpt.py: load_classification
def load_classification(data: str, seed: int):
    """(name, train rows, dev rows) of (label, text). sst2: GLUE's train.tsv and dev.tsv (the test split
    has no labels). A folder: train.tsv and dev.tsv as `label<TAB>text`. builtin: synthetic."""
    if data == "sst2":
        root = download("sst2", DATASETS["sst2"])
        if root is None:
            log0("offline: falling back to the built-in synthetic sentiment task instead of sst2")
            data = "builtin"
        else:
            return "sst2", read_tsv(root / "train.tsv", True), read_tsv(root / "dev.tsv", True)
    if data == "builtin":
        log0("fine-tuning on the built-in SYNTHETIC sentiment task (generated, not real reviews)")
        return "builtin-synthetic", synthetic_sentiment(2000, seed), synthetic_sentiment(400, seed + 1)
    path = Path(data)
    if not path.is_dir():
        raise UserError(f"unknown classification data {data!r}: use sst2, builtin or a folder with "
                        "train.tsv and dev.tsv")
    glue = (path / "train.tsv").is_file() and read_text(path / "train.tsv").startswith("sentence\t")
    return path.name, read_tsv(path / "train.tsv", glue), read_tsv(path / "dev.tsv", glue)


def encode_classification(rows, tok: WordPiece, labels: dict, max_len: int, split: str):
    """`[CLS] A [SEP]` or `[CLS] A [SEP] B [SEP]` (a tab in the text separates A and B); the longer
    side loses tokens from its end until the pair fits (run_classifier.py's _truncate_seq_pair)."""
    examples, unknown = [], 0
    for label, text in rows:
        if label not in labels:
            if split == "train":
                raise UserError(f"label {label!r} in the {split} data is not one of {sorted(labels)}")
            unknown += 1
        first, _, second = text.partition("\t")
        a, b = tok.encode(first), tok.encode(second) if second.strip() else None
        while len(a) + len(b or []) > max_len - (3 if b is not None else 2):
            (a if b is None or len(a) > len(b) else b).pop()
        ids = [tok.cls_id, *a, tok.sep_id] + ([*b, tok.sep_id] if b is not None else [])
        examples.append((ids, len(a) + 2, labels.get(label, -1)))
    if unknown:
        log0(f"warning: {unknown} {split} examples have labels unseen in training; counted as errors")
    return examples


def collate(examples) -> dict:
    T = max(len(ids) for ids, _, _ in examples)
    batch = {"input_ids": torch.zeros(len(examples), T, dtype=torch.long),
             "token_type_ids": torch.zeros(len(examples), T, dtype=torch.long),
             "attention_mask": torch.zeros(len(examples), T, dtype=torch.bool),
             "labels": torch.tensor([y for _, _, y in examples])}
    for r, (ids, n_first, _) in enumerate(examples):
        batch["input_ids"][r, :len(ids)] = torch.tensor(ids)
        batch["token_type_ids"][r, n_first:len(ids)] = 1
        batch["attention_mask"][r, :len(ids)] = True
    return batch


# Copied from gpt.py: EpochSampler
class EpochSampler:
    """Shuffled minibatches, a new permutation per epoch (seeded); every rank gets the same number of
    batches, each its own slice. The data position saved in checkpoints is (epoch, batch index)."""

    def __init__(self, examples, batch_size, seed, rank=0, world=1):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.rank, self.world = rank, world
        self.per_epoch = max(1, len(examples) // (batch_size * world))
        self.epoch, self.index = 0, 0
        self.order, self.order_epoch = [], None

    def __next__(self) -> dict:
        if self.index == self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        if self.order_epoch != self.epoch:  # one permutation per epoch, derived from the epoch
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            self.order, self.order_epoch = torch.randperm(len(self.examples), generator=gen).tolist(), self.epoch
        start = (self.index * self.world + self.rank) * self.batch_size
        self.index += 1
        return collate([self.examples[i] for i in self.order[start:start + self.batch_size]])

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state):
        self.epoch, self.index = state["epoch"], state["index"]


# -----------------------------------------------------------------------------------------------------
# Training loop: device and precision, DDP, optimizer and schedule, checkpoints, logging

# Copied from gpt.py: setup_device
def setup_device(cfg) -> tuple[torch.device, torch.dtype, contextlib.AbstractContextManager]:
    """Device (auto: cuda, then mps, then cpu) and autocast dtype (auto: bf16 where supported)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but no CUDA GPU is available")
        name = f"cuda:{local_rank}" if name == "cuda" else name
        torch.cuda.set_device(name)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps was asked for but MPS is not available")
    device = torch.device(name)
    dtype = cfg.dtype if cfg.dtype != "auto" else os.environ.get("NLP_LINEAGE_AUTO_DTYPE", "auto")
    if dtype == "auto":
        cpu_bf16 = device.type == "cpu" and any(
            f in Path("/proc/cpuinfo").read_text() for f in ("avx512_bf16", "amx_bf16")
        ) if Path("/proc/cpuinfo").exists() else False
        gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if cpu_bf16 or gpu_bf16 else "float32"
    pt_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    ctx = (contextlib.nullcontext() if pt_dtype == torch.float32
           else torch.autocast(device_type=device.type, dtype=pt_dtype))
    return device, pt_dtype, ctx


# Copied from gpt.py: setup_ddp
def setup_ddp(device: torch.device) -> tuple[int, int]:
    """(rank, world size); under torchrun, joins the process group (NCCL on CUDA, Gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)  # one group for all of a main job's stages
    return (dist.get_rank(), world) if world > 1 else (0, 1)


# Copied from gpt.py: make_optimizer
def make_optimizer(model: nn.Module, lr, weight_decay, betas, eps, device) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on matrices only (no decay on biases, LayerNorms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device.type == "cuda")


# Copied from gpt.py: lr_lambda
def lr_lambda(warmup: int, total: int, floor: float, shape: str):
    """Multiplier of the peak lr: linear warmup from 0, then cosine (pretraining) or linear (fine-tuning)
    decay to `floor` (min_lr / lr) at the end of the schedule."""
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if shape == "cosine" else 1 - progress
        return floor + (1 - floor) * decay
    return f


# Copied from gpt.py: rng_state
def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


# Copied from gpt.py: set_rng_state
def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Copied from gpt.py: save_checkpoint
def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: write a temporary file, fsync it, then rename over the old checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# Copied from gpt.py: load_checkpoint
def load_checkpoint(path: str) -> dict:
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({e.__class__.__name__})") from None


# Copied from gpt.py: check_compatible
def check_compatible(ckpt: dict, cfg, script: str, fields=None) -> None:
    """A checkpoint must come from this script and, for the architecture fields, the same model."""
    if ckpt.get("script") != script:
        raise UserError(f"checkpoint was written by {ckpt.get('script', 'another program')}, not {script}")
    for name in fields if fields is not None else ARCH_FIELDS:
        theirs, ours = ckpt["config"].get(name), getattr(cfg, name)
        if theirs != ours:
            raise UserError(f"checkpoint has {name}={theirs} but this run has {name}={ours}; "
                            "use the checkpoint's architecture")


# Copied from gpt.py: MetricsLog
class MetricsLog:
    """One line per record on stdout (rank 0) and one JSON object per line in out_dir/metrics.jsonl."""

    def __init__(self, out_dir: Path, rank: int):
        self.path, self.rank = out_dir / "metrics.jsonl", rank

    def __call__(self, **rec):
        if self.rank:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()),
              flush=True)


# Copied from gpt.py: measure_peak_flops
def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul FLOP/s of this device in this dtype: the denominator of MFU."""
    n = 4096 if device.type == "cuda" else 1024
    a = torch.full((n, n), 0.5, device=device, dtype=dtype)  # no random numbers: resume stays exact
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ a
    sync()
    reps, t0 = 5, time.perf_counter()
    for _ in range(reps):
        a @ a
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


# Copied from gpt.py: run_training with gpt.py->bert.py, cfg.min_lr->0.0, 1e-8->cfg.adam_eps
def run_training(cfg: Config, stage: str, model: nn.Module, sampler, loss_fn, evaluate, total_steps: int,
                 lr: float, warmup: int, shape: str, extra: dict, tokens_per_step: int,
                 flops_per_token: float) -> dict:
    """The loop shared by pretraining and fine-tuning: AdamW + schedule, accumulation with DDP sync on the
    last micro-step, clipping, bf16/fp16 autocast, evaluation and atomic checkpoints, exact resume."""
    device, dtype, ctx = setup_device(cfg)
    rank, world = setup_ddp(device)
    out = Path(cfg.out_dir)
    model.to(device)
    opt = make_optimizer(model, lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.adam_eps, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total_steps, 0.0 / cfg.lr
                                                             if shape == "cosine" else 0.0, shape))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step, best = 0, None
    if cfg.resume:
        ckpt = load_checkpoint(str(out / "ckpt.pt"))
        check_compatible(ckpt, cfg, "bert.py")
        if ckpt["stage"] != stage:
            raise UserError(f"{out / 'ckpt.pt'} is a {ckpt['stage']} checkpoint, not {stage}")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        sampler.load_state_dict(ckpt["data"][rank] if world == len(ckpt["data"]) else ckpt["data"][0])
        set_rng_state(ckpt["rng"])
        step, best = ckpt["step"], ckpt["best"]
        log0(f"resumed {stage} from {out / 'ckpt.pt'} at step {step}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    log = MetricsLog(out, rank)
    raw = model
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                    else None)
    peak = measure_peak_flops(device, dtype) if rank == 0 else 1.0

    def checkpoint(data_state=None, rng=None):
        data = [data_state or sampler.state_dict()]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, data[0])
            data = gathered
        if rank == 0:
            save_checkpoint(out / "ckpt.pt", {
                "script": "bert.py", "stage": stage, "model": raw.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "step": step, "data": data,
                "rng": rng or rng_state(), "config": dataclasses.asdict(cfg), "best": best, **extra})

    def run_eval():
        nonlocal best
        raw.eval()
        with torch.no_grad(), ctx:
            metrics = evaluate(raw, device)
        raw.train()
        key = "acc" if "acc" in metrics else "loss"
        better = best is None or (metrics[key] > best if key == "acc" else metrics[key] < best)
        best = metrics[key] if better else best
        log(step=step, split="val", **metrics)
        return metrics

    t0 = t_last = time.time()
    at_step_start = (None, None)
    start_step, metrics = step, {}
    stop = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    model.train()
    try:
        while step < stop:
            at_step_start = sampler.state_dict(), rng_state()  # what Ctrl-C saves mid-step
            for micro in range(cfg.grad_accum):
                batch = {k: v.to(device) for k, v in next(sampler).items()}
                sync = micro == cfg.grad_accum - 1
                with (contextlib.nullcontext() if sync or world == 1 else model.no_sync()), ctx:
                    loss = loss_fn(model, batch)
                    scaler.scale(loss / cfg.grad_accum).backward()
            if not torch.isfinite(loss):
                raise UserError(f"loss became {loss.item()} at step {step}; stopped, the last good "
                                f"checkpoint is {out / 'ckpt.pt'} (try a lower --lr)")
            scaler.unscale_(opt)
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            at_step_start = (None, None)  # the step is complete: Ctrl-C from here saves the current state
            if step % cfg.log_interval == 0 or step == stop:
                now = time.time()
                n = (step - start_step - 1) % cfg.log_interval + 1
                tok_s = n * tokens_per_step / max(now - t_last, 1e-9)
                eta = (now - t0) / (step - start_step) * (stop - step)
                log(step=step, split="train", loss=loss.item(), lr=sched.get_last_lr()[0], tok_s=round(tok_s),
                    mfu=tok_s * flops_per_token / world / peak, elapsed=round(now - t0, 1), eta=round(eta, 1))
                t_last = now
            if step % cfg.eval_interval == 0 or step == stop:
                metrics = run_eval() if rank == 0 else {}
                checkpoint()
    except KeyboardInterrupt:
        checkpoint(*at_step_start)
        log0(f"interrupted: saved {out / 'ckpt.pt'} at step {step}; continue with --resume")
        return {"step": step, "interrupted": True}
    if not metrics:  # resumed at the end of the schedule: nothing to train, evaluate once more
        metrics = run_eval() if rank == 0 else {}
    if world > 1:
        dist.barrier()  # the checkpoint is on disk before any rank starts a next stage from it
    summary = {"step": step, **metrics}
    log0("final " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    return summary


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def pretrain(cfg: Config) -> dict:
    """Stage `pretrain`: learn the WordPiece vocabulary (or reuse init_from's), then MLM + NSP."""
    seed_everything(cfg.seed)
    name, train_docs, val_docs = load_documents(cfg.data)
    model, tok = None, None
    if cfg.resume:
        tok = tokenizer_from_state(load_checkpoint(str(Path(cfg.out_dir) / "ckpt.pt"))["tokenizer"])
    elif cfg.init_from:
        model, tok, cfg = load_pretrained(cfg)
    if tok is None:
        t0 = time.time()
        tok = WordPiece.train((s for d in train_docs for s in d), cfg.wordpiece_vocab_size, cfg.lower_case)
        log0(f"trained WordPiece: {len(tok)} tokens in {time.time() - t0:.1f}s")
    if not cfg.vocab_size:
        cfg = dataclasses.replace(cfg, vocab_size=len(tok))
    if cfg.vocab_size < len(tok):
        raise UserError(f"--vocab_size {cfg.vocab_size} is smaller than the tokenizer's {len(tok)} tokens")
    model = model or build_model(cfg)
    train, val = tokenize_documents(train_docs, tok), tokenize_documents(val_docs, tok)
    if len(train) < 2 or len(val) < 2:
        raise UserError(f"{name} gives {len(train)} training and {len(val)} validation documents; "
                        "next-sentence prediction needs at least 2 of each")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    sampler = PretrainingSampler(train, tok, cfg, cfg.total_steps, rank, world)
    val_set = create_instances(val, tok, cfg, cfg.max_seq_length, random.Random(f"{cfg.seed}-val"), True)
    if cfg.eval_batches and len(val_set) > cfg.eval_batches * cfg.batch_size:  # evenly spread, fixed
        val_set = [val_set[i] for i in np.linspace(0, len(val_set) - 1, cfg.eval_batches * cfg.batch_size)
                   .round().astype(int)]
    n_params = sum(p.numel() for p in model.parameters())
    log0(f"pretraining on {name}: {len(train)} train / {len(val)} val documents, "
         f"{sum(len(s) for d in train for s in d):,} train tokens, vocab {len(tok)}, "
         f"{n_params / 1e6:.2f}M parameters")

    def evaluate(m, device):
        mlm_sum = nsp_sum = mlm_right = nsp_right = n_mlm = 0
        for i in range(0, len(val_set), cfg.batch_size):
            b = {k: v.to(device) for k, v in
                 collate_pretraining(val_set[i:i + cfg.batch_size], tok, cfg, cfg.max_seq_length).items()}
            mlm, nsp, mlm_logits, targets, nsp_logits = pretrain_losses(m, b)
            mlm_sum += mlm.item() * len(targets)
            nsp_sum += nsp.item() * len(nsp_logits)
            mlm_right += (mlm_logits.argmax(-1) == targets).sum().item()
            nsp_right += (nsp_logits.argmax(-1) == b["nsp_labels"]).sum().item()
            n_mlm += len(targets)
        return {"loss": mlm_sum / n_mlm + nsp_sum / len(val_set), "mlm_loss": mlm_sum / n_mlm,
                "nsp_loss": nsp_sum / len(val_set), "mlm_acc": mlm_right / n_mlm, "nsp_acc": nsp_right / len(val_set)}

    metrics = run_training(cfg, "pretrain", model, sampler, pretrain_loss, evaluate, cfg.total_steps, cfg.lr,
                           cfg.warmup_steps, "linear", {"tokenizer": tok.state()},
                           cfg.batch_size * cfg.max_seq_length * cfg.grad_accum * world,
                           model.flops_per_token(cfg.max_seq_length))
    if rank == 0:  # for Hugging Face's BertTokenizer.from_pretrained(out_dir)
        tok.save(Path(cfg.out_dir) / "vocab.txt")
    return metrics


def finetune(cfg: Config) -> dict:
    """Stage `finetune`: sentence (pair) classification from a pretrained checkpoint (section 4.1)."""
    seed_everything(cfg.seed)
    if not cfg.init_from and not cfg.resume:
        raise UserError("finetune needs --init_from a pretrained checkpoint (python bert.py pretrain ...) "
                        "or hf:DIR")
    if cfg.resume:
        ckpt = load_checkpoint(str(Path(cfg.out_dir) / "ckpt.pt"))
        tok = tokenizer_from_state(ckpt["tokenizer"])
        cfg = dataclasses.replace(cfg, **{k: ckpt["config"][k] for k in ARCH_FIELDS})
        bert, label_list = build_model(cfg).bert, ckpt["labels"]
    else:
        model, tok, cfg = load_pretrained(cfg)
        bert, label_list = model.bert, None
    name, train_rows, dev_rows = load_classification(cfg.finetune_data, cfg.seed)
    label_list = label_list or sorted({label for label, _ in train_rows})
    labels = {label: i for i, label in enumerate(label_list)}
    train = encode_classification(train_rows, tok, labels, cfg.max_seq_length, "train")
    dev = encode_classification(dev_rows, tok, labels, cfg.max_seq_length, "dev")
    model = BertClassifier(bert, len(labels), cfg.clf_dropout)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    sampler = EpochSampler(train, cfg.finetune_batch_size, cfg.seed, rank, world)
    total = sampler.per_epoch * cfg.finetune_epochs
    log0(f"fine-tuning on {name}: {len(train)} train / {len(dev)} dev examples, labels {label_list}, "
         f"{total} steps")

    def loss_fn(m, b):
        return F.cross_entropy(m(b["input_ids"], b["token_type_ids"], b["attention_mask"]).float(), b["labels"])

    def evaluate(m, device):
        correct, loss_sum = 0, 0.0
        for i in range(0, len(dev), cfg.finetune_batch_size):
            b = {k: v.to(device) for k, v in collate(dev[i:i + cfg.finetune_batch_size]).items()}
            logits = m(b["input_ids"], b["token_type_ids"], b["attention_mask"]).float()
            correct += (logits.argmax(-1) == b["labels"]).sum().item()
            known = b["labels"] >= 0
            if known.any():
                loss_sum += F.cross_entropy(logits[known], b["labels"][known], reduction="sum").item()
        return {"loss": loss_sum / len(dev), "acc": correct / len(dev)}

    mean_len = sum(len(x) for x, _, _ in train) / len(train)
    return run_training(dataclasses.replace(cfg, lr=cfg.finetune_lr), "finetune", model, sampler, loss_fn,
                        evaluate, total, cfg.finetune_lr, math.ceil(cfg.finetune_warmup * total), "linear",
                        {"tokenizer": tok.state(), "labels": label_list},
                        round(cfg.finetune_batch_size * mean_len * cfg.grad_accum * world),
                        bert.flops_per_token(round(mean_len)))


# -----------------------------------------------------------------------------------------------------
# Pretrained weights: our checkpoints, and Hugging Face BERT directories


def load_pretrained(cfg: Config):
    """(BertForPreTraining, tokenizer, cfg with the checkpoint's architecture) from --init_from."""
    if cfg.init_from.startswith("hf:"):
        return load_hf(cfg.init_from[3:], cfg)
    ckpt = load_checkpoint(cfg.init_from)
    if ckpt.get("script") != "bert.py":
        raise UserError(f"{cfg.init_from} was written by {ckpt.get('script', 'another program')}, not bert.py")
    cfg = dataclasses.replace(cfg, **{k: ckpt["config"][k] for k in ARCH_FIELDS})
    model = build_model(cfg)
    if ckpt["stage"] == "finetune":  # a classifier: take its encoder, the pretraining heads start afresh
        model.bert.load_state_dict({k[5:]: v for k, v in ckpt["model"].items() if k.startswith("bert.")})
    else:
        model.load_state_dict(ckpt["model"])
    return model, tokenizer_from_state(ckpt["tokenizer"]), cfg


def load_hf(path: str, cfg: Config):
    """Map a Hugging Face BertForPreTraining (or BertModel) directory onto BertForPreTraining: query, key
    and value are concatenated into qkv; old checkpoints' LayerNorm gamma/beta are renamed. The tokenizer
    is its vocab.txt, cased or not as tokenizer_config.json says (uncased by default)."""
    root = Path(path)
    if not (root / "config.json").is_file():
        raise UserError(f"{root} has no config.json: --init_from hf:DIR needs a Hugging Face model folder")
    hf = json.loads((root / "config.json").read_text())
    if hf.get("model_type") != "bert":
        raise UserError(f"{root} holds a {hf.get('model_type')} model; only bert loads into bert.py")
    gelu = {"gelu": "exact", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}.get(hf.get("hidden_act", "gelu"))
    if gelu is None or hf.get("layer_norm_eps", 1e-12) != 1e-12:
        raise UserError(f"{root} uses activation {hf.get('hidden_act')} and LayerNorm eps "
                        f"{hf.get('layer_norm_eps')}; bert.py has GELU and eps 1e-12")
    if not (root / "vocab.txt").is_file():
        raise UserError(f"{root} has no vocab.txt")
    if (root / "model.safetensors").is_file():
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError("reading model.safetensors needs the safetensors package: "
                            "pip install safetensors") from None
        sd = load_file(str(root / "model.safetensors"))
    elif (root / "pytorch_model.bin").is_file():
        sd = torch.load(root / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise UserError(f"{root} has neither model.safetensors nor pytorch_model.bin")
    sd = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v
          for k, v in sd.items()}
    if not any(k.startswith("bert.") for k in sd):  # a bare BertModel
        sd = {"bert." + k: v for k, v in sd.items()}
    cfg = dataclasses.replace(cfg, n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                              d_model=hf["hidden_size"], d_ff=hf["intermediate_size"],
                              max_position=hf["max_position_embeddings"],
                              type_vocab_size=hf.get("type_vocab_size", 2), vocab_size=hf["vocab_size"], gelu=gelu)
    model = build_model(cfg)
    names = {"bert.tok": "bert.embeddings.word_embeddings", "bert.pos": "bert.embeddings.position_embeddings",
             "bert.seg": "bert.embeddings.token_type_embeddings", "bert.ln": "bert.embeddings.LayerNorm",
             "bert.pooler": "bert.pooler.dense", "mlm_dense": "cls.predictions.transform.dense",
             "mlm_ln": "cls.predictions.transform.LayerNorm", "nsp": "cls.seq_relationship"}
    for i in range(cfg.n_layer):
        theirs = f"bert.encoder.layer.{i}."
        names |= {f"bert.layers.{i}.attn.proj": theirs + "attention.output.dense",
                  f"bert.layers.{i}.ln_1": theirs + "attention.output.LayerNorm",
                  f"bert.layers.{i}.fc1": theirs + "intermediate.dense",
                  f"bert.layers.{i}.fc2": theirs + "output.dense", f"bert.layers.{i}.ln_2": theirs + "output.LayerNorm"}
        for p in ("weight", "bias"):
            qkv = [sd.get(f"{theirs}attention.self.{n}.{p}") for n in ("query", "key", "value")]
            if all(w is not None for w in qkv):
                sd[f"bert.layers.{i}.attn.qkv.{p}"] = torch.cat(qkv)
    sd["mlm_bias"] = sd.get("cls.predictions.bias", sd.get("cls.predictions.decoder.bias"))
    state, missing = {}, []
    for ours, ref in model.state_dict().items():
        module, _, p = ours.rpartition(".")
        key = ours if ours == "mlm_bias" or ".qkv." in ours else f"{names.get(module, module)}.{p}"
        w = sd.get(key)
        if w is None:
            missing.append(key)
            continue
        if w.shape != ref.shape:
            raise UserError(f"{root}: {key} has shape {tuple(w.shape)}, expected {tuple(ref.shape)}")
        state[ours] = w
    if any(k.startswith("bert.") for k in missing):
        raise UserError(f"{root} has no weight {next(k for k in missing if k.startswith('bert.'))}; "
                        "is it a complete BERT checkpoint?")
    if missing:
        log0(f"{root} has no pretraining heads ({', '.join(missing)}); they start from random weights")
    model.load_state_dict(state, strict=False)
    tcfg = root / "tokenizer_config.json"
    lower = json.loads(tcfg.read_text()).get("do_lower_case", True) if tcfg.is_file() else True
    return model, WordPiece.load(root / "vocab.txt", lower), cfg


# -----------------------------------------------------------------------------------------------------
# CLI

# Copied from gpt.py: parse_config
def parse_config(argv, doc: str, stages, presets: dict):
    """`[STAGE] --preset P --<field> VALUE ...`: flags generated from Config; preset values are the
    defaults that explicit flags override."""
    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, exit status 2
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)

    p = Parser(description=doc.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
               epilog=f"stages: {', '.join(stages)}; with no stage, the main job runs")
    p.add_argument("stage", nargs="?", choices=stages, help="stage to run (default: the main job)")
    p.add_argument("--preset", default="small", choices=sorted(presets))
    for f in dataclasses.fields(presets["small"]):
        kind = type(f.default)
        if kind is bool:
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=None,
                           help=f"(default {f.default})")
        else:
            p.add_argument(f"--{f.name}", type=kind, default=None, help=f"(default {f.default})")
    args = p.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(presets["small"])
                 if getattr(args, f.name) is not None}
    return args.stage, dataclasses.replace(presets[args.preset], **overrides)


def main(argv=None) -> dict:
    stage, cfg = parse_config(argv, __doc__, STAGES, PRESETS)
    try:
        validate(cfg)
        if stage == "pretrain":
            return pretrain(cfg)
        if stage == "finetune":
            return finetune(cfg)
        # the main job: pretrain into out_dir/pretrain, then fine-tune from it into out_dir/finetune
        root = Path(cfg.out_dir)
        ckpt = root / "pretrain" / "ckpt.pt"
        pre = pretrain(dataclasses.replace(cfg, out_dir=str(root / "pretrain")))
        fin = finetune(dataclasses.replace(cfg, out_dir=str(root / "finetune"), resume=False,
                                           init_from=str(ckpt)))
        nan = float("nan")
        log0(f"BERT {cfg.data}: MLM accuracy {pre.get('mlm_acc', nan):.3f}, NSP accuracy "
             f"{pre.get('nsp_acc', nan):.3f}; {cfg.finetune_data} dev accuracy {fin.get('acc', nan):.3f}")
        return {"pretrain": pre, "finetune": fin}
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
