"""ELMo: deep contextualized word representations from a character-based bidirectional language model.

Paper: Matthew E. Peters, Mark Neumann, Mohit Iyyer, Matt Gardner, Christopher Clark, Kenton Lee, Luke
Zettlemoyer, "Deep contextualized word representations", NAACL 2018, arXiv:1802.05365. The released model
and its training code are allenai/bilm-tf; AllenNLP's modules/elmo.py loads the released weights.

What this file reproduces
  - Character input as the released ELMo: a token is its UTF-8 bytes (at most 48) between begin- and
    end-of-word ids, padded to 50; `<S>`/`</S>` have their own ids; every id is shifted by +1 so that 0 is
    padding (262 rows in the character table); a padding token is all zeros.
  - Section 3.1, the biLM as bilm-tf builds it: a character CNN (16-d characters, widths 1-7 with
    32..1024 filters, max over positions, ReLU), 2 highway layers, a linear projection to 512; per direction
    2 LSTM layers of 4096 cells projected to 512, the cell clipped to [-3, 3] before the output tanh and the
    projection clipped to [-3, 3], a residual connection around the second layer; separate forward and
    backward stacks sharing the token representation and the softmax. The objective is the mean of the
    forward and backward LM losses (eq. 3), full softmax or sampled softmax with a log-uniform sampler.
  - Stateful pretraining as the original: sentences `<S> w1 .. wn </S>` packed into one stream (the
    backward LM reads the reversed stream), windows of 20 tokens, the LSTM state carried from batch to batch
    per row with truncated BPTT; `reset_states()`. Embedding sentences is stateless by default.
  - Sections 3.2-3.3: ELMo_k = gamma * sum_j s_j h_kj with s = softmax(w) (eq. 1), optional batch-wide
    layer normalisation, dropout, an L2 penalty on w, several independent mixes from one biLM pass; the biLM
    frozen and ELMo concatenated to a task model's input (and optionally its output).
  - The released weights: `--init_from allennlp:OPTIONS_JSON,WEIGHTS_HDF5` (needs h5py), checked against
    TensorFlow's outputs for AllenNLP's test model (largest difference 1e-6; tests/test_elmo.py).

Implementation notes (exact, for speed or numerics): the character CNN runs once per distinct token of a
batch; the clipped cell is a per-timestep loop (nn.LSTM cannot clip) with the input half of every gate
computed for the whole window at once, about 0.7x the speed of nn.LSTM(proj_size) of the same size
(bench/RESULTS.md); the recurrence and the softmax stay in fp32 under autocast. Under DDP each rank
carries its own LSTM state; checkpoints keep rank 0's, so a multi-rank resume restarts the others' from it.

Run it
  python elmo.py                                   # main job: small biLM on wikitext2, then SST-2 with and
                                                   # without ELMo (offline: built-in text and a synthetic task)
  python elmo.py pretrain --data wikitext2 --out_dir out/bilm
  python elmo.py task --init_from out/bilm/ckpt.pt --task_data sst2 --out_dir out/sst2
  python elmo.py task --no-use_elmo --out_dir out/sst2-baseline   # the same classifier without ELMo
  python elmo.py embed --init_from allennlp:options.json,lm_weights.hdf5 --embed_file sents.txt
  torchrun --nproc_per_node=2 elmo.py pretrain ...   # data parallel

Stages and their hyperparameters: `pretrain` uses the plain fields (bilm-tf's train_elmo.py: Adagrad lr
0.2, batch 128, 20 unrolled steps, dropout 0.1); `task` uses the `task_*` fields; `embed` writes one array
(3, n_tokens, 2 * proj_dim) per line of --embed_file into out_dir/elmo.hdf5 (elmo.npz without h5py).

Deliberate deviations from the paper and from bilm-tf
  - bilm-tf differentiates loss * unroll_steps, clips that gradient at global norm 10 and runs Adagrad
    with initial accumulator 1. We differentiate the mean loss with the accumulator started at 1/20^2 and
    the clip at 10/20: the same updates, since k g / sqrt(1 + k^2 sum g^2) = g / sqrt(1/k^2 + sum g^2).
  - Sampled softmax draws its negatives with replacement (TensorFlow draws unique ones), with the usual
    log Q correction and accidental hits removed. Evaluation always uses the full softmax.
  - The backward LM reads the reversed training stream in the same row layout as the forward LM (bilm-tf
    shuffles the two streams independently). Lines of the corpus are its sentences.
  - Data: the 1B Word Benchmark is too large for this script's purpose; the default is WikiText-2 and,
    offline, the Python documentation (pydoc_data). Smaller presets shrink every width.
  - Downstream: a BiLSTM classifier with max pooling on SST-2 with randomly initialised word vectors (the
    paper's SST-5 model is a BCN with GloVe); the classifier without ELMo is the baseline.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
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

# -----------------------------------------------------------------------------------------------------
# Config


@dataclass
class Config:
    # character CNN (section 3.1; bilm-tf bin/train_elmo.py)
    char_embed_dim: int = 16
    filters: str = "1x32,2x32,3x64,4x128,5x256,6x512,7x1024"  # width x count per convolution
    n_highway: int = 2
    # biLSTM (section 3.1: "2 biLSTM layers with 4096 units and 512 dimension projections")
    n_layers: int = 2
    lstm_dim: int = 4096  # memory cells per layer and direction
    proj_dim: int = 512  # projected output; also the token representation's width
    cell_clip: float = 3.0
    proj_clip: float = 3.0
    residual: bool = True  # residual connection around every layer but the first (use_skip_connections)
    vocab_size: int = 0  # softmax words incl. <S> </S> <UNK>; 0 = every training word (1B Word: 793,471)
    n_negative: int = 8192  # sampled softmax negatives per batch; 0 = full softmax
    dropout: float = 0.1  # on every LSTM layer's input and on the top layer before the softmax
    # data
    data: str = "wikitext2"  # wikitext2 | builtin | a text file | a folder with train.txt and valid.txt
    # pretraining (bilm-tf): Adagrad lr 0.2, batch 128 per GPU x 3 GPUs, 20 unrolled steps, 10 epochs
    batch_size: int = 128
    unroll_steps: int = 20
    grad_accum: int = 1
    lr: float = 0.2
    adagrad_init: float = 1 / 400  # initial Adagrad accumulator (bilm-tf's 1.0 for the loss times 20)
    schedule: str = "constant"  # constant (bilm-tf) | cosine (to min_lr)
    min_lr: float = 0.0
    total_steps: int = 1_000_845  # 10 epochs of 768,648,884 tokens in batches of 3 x 128 x 20
    weight_decay: float = 0.0
    beta1: float = 0.9  # Adam (the task model)
    beta2: float = 0.999
    grad_clip: float = 0.5  # global norm (bilm-tf's 10 for the loss times 20)
    # ELMo and the downstream task (sections 3.2-3.3)
    task_data: str = "sst2"  # sst2 | builtin | a folder with train.tsv and dev.tsv
    use_elmo: bool = True  # --no-use_elmo: the same classifier without ELMo (the baseline)
    elmo_output: bool = False  # also concatenate a second mix to the task biLSTM's output
    layer_norm: bool = False  # normalise each biLM layer before mixing (bilm-tf do_layer_norm)
    l2_coef: float = 0.001  # lambda ||w||^2 on the mix weights
    task_dropout: float = 0.5  # on the ELMo vectors (AllenNLP's default) and the classifier's inputs
    task_embed_dim: int = 300
    task_hidden: int = 300
    task_lr: float = 1e-3
    task_batch_size: int = 32
    task_epochs: float = 3.0
    # embed
    embed_file: str = ""  # text to embed: one whitespace-tokenised sentence per line
    # run control
    out_dir: str = "out/elmo"
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    compile: bool = False
    seed: int = 1337
    eval_interval: int = 1000
    eval_batches: int = 100  # windows per row of the validation stream per evaluation; 0 = all of it
    log_interval: int = 50
    max_steps: int = 0  # stop this run early at this step (0 = run the whole schedule)
    resume: bool = False
    init_from: str = ""  # a checkpoint (ckpt.pt), or allennlp:OPTIONS_JSON,WEIGHTS_HDF5


PRESETS = {
    "paper": Config(),
    "small": Config(filters="1x32,2x32,3x64,4x128", proj_dim=128, lstm_dim=512, n_negative=1024,
                    batch_size=32, total_steps=600, eval_interval=200, eval_batches=40, log_interval=25,
                    task_embed_dim=100, task_hidden=100, task_epochs=0.3),
    "tiny": Config(char_embed_dim=4, filters="1x4,2x8,3x16", proj_dim=8, lstm_dim=16, vocab_size=300,
                   n_negative=0, batch_size=4, unroll_steps=6, total_steps=8, eval_interval=100,
                   eval_batches=3, log_interval=4, task_embed_dim=8, task_hidden=8, task_batch_size=8,
                   task_epochs=0.04),
}
ARCH_FIELDS = ("char_embed_dim", "filters", "n_highway", "n_layers", "lstm_dim", "proj_dim", "cell_clip",
               "proj_clip", "residual", "vocab_size")
STAGES = ("pretrain", "embed", "task")


# Copied from gpt.py: UserError
class UserError(Exception):
    """Bad input: main() prints it as one line `error: ...` and exits with status 2."""


def parse_filters(spec: str) -> list[tuple[int, int]]:
    """"1x32,2x32" -> [(1, 32), (2, 32)]: (width, count) of each character convolution."""
    try:
        pairs = [tuple(int(v) for v in p.split("x")) for p in spec.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or p[0] <= 0 or p[1] <= 0 or p[0] > MAX_CHARS for p in pairs):
        raise UserError(f"--filters must look like 1x32,2x64 (width x count, widths 1..{MAX_CHARS}), "
                        f"not {spec!r}")
    return pairs


def validate(cfg: Config) -> None:
    for name in ("char_embed_dim", "n_layers", "lstm_dim", "proj_dim", "batch_size", "unroll_steps",
                 "grad_accum", "total_steps", "task_embed_dim", "task_hidden", "task_batch_size",
                 "eval_interval", "log_interval"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("n_highway", "vocab_size", "n_negative", "max_steps", "eval_batches", "weight_decay",
                 "grad_clip", "l2_coef", "cell_clip", "proj_clip"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must not be negative, got {getattr(cfg, name)}")
    if 0 < cfg.vocab_size < len(SPECIAL_WORDS) + 1:
        raise UserError(f"--vocab_size must be 0 or at least {len(SPECIAL_WORDS) + 1}")
    parse_filters(cfg.filters)
    for name in ("dropout", "task_dropout"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise UserError(f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    if not (cfg.lr > 0 and cfg.task_lr > 0 and cfg.adagrad_init > 0 and 0 <= cfg.min_lr <= cfg.lr):
        raise UserError("--lr, --task_lr and --adagrad_init must be positive, with 0 <= --min_lr <= --lr")
    if cfg.task_epochs <= 0:
        raise UserError(f"--task_epochs must be positive, got {cfg.task_epochs}")
    if cfg.schedule not in ("constant", "cosine"):
        raise UserError(f"--schedule must be constant or cosine, not {cfg.schedule!r}")
    if cfg.device not in ("auto", "cpu", "cuda", "mps") and not cfg.device.startswith("cuda:"):
        raise UserError(f"--device must be auto, cpu, cuda or mps, not {cfg.device!r}")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"--dtype must be auto, float32, bfloat16 or float16, not {cfg.dtype!r}")


# -----------------------------------------------------------------------------------------------------
# Characters and words: the released ELMo's character ids, and the softmax's word vocabulary

MAX_CHARS = 50  # characters per token, begin- and end-of-word included
BOS_CHAR, EOS_CHAR, BOW_CHAR, EOW_CHAR, PAD_CHAR = 256, 257, 258, 259, 260  # after the 256 byte values
N_CHARS = 262  # 261 ids shifted by +1, and row 0 for padding tokens
SPECIAL_WORDS = ("<S>", "</S>", "<UNK>")  # the first three words of bilm-tf's vocabulary files


def token_chars(word: str) -> list[int]:
    """The 50 character ids of one token, shifted by +1 (so no id is 0)."""
    if word in ("<S>", "</S>"):
        body = [BOS_CHAR if word == "<S>" else EOS_CHAR]
    else:
        body = list(word.encode("utf-8", "ignore")[:MAX_CHARS - 2])
    ids = [BOW_CHAR, *body, EOW_CHAR] + [PAD_CHAR] * (MAX_CHARS - 2 - len(body))
    return [i + 1 for i in ids]


def batch_chars(sentences: list[list[str]]) -> torch.Tensor:
    """Character ids (B, T, 50) of right-padded sentences; a padding token is 50 zeros."""
    out = torch.zeros(len(sentences), max(map(len, sentences), default=0), MAX_CHARS, dtype=torch.long)
    for b, words in enumerate(sentences):
        if words:
            out[b, :len(words)] = torch.tensor([token_chars(w) for w in words])
    return out


def build_vocab(tokens: list[str], vocab_size: int) -> list[str]:
    """Softmax words sorted by descending frequency (the log-uniform sampler assumes it), specials first."""
    counts = Counter(t for t in tokens if t not in SPECIAL_WORDS)
    words = sorted(counts, key=lambda w: (-counts[w], w))
    return list(SPECIAL_WORDS) + words[:vocab_size - len(SPECIAL_WORDS) if vocab_size else None]


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
        f"glue_data/SST-2/{f}.tsv", h) for s, f, h in (  # train_full.tsv: that repo's train.tsv is a subset
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


def load_lm_text(data: str) -> tuple[str, str, str]:
    """(name, train text, validation text). wikitext2 and folders with train.txt + valid.txt: those
    files; a single file or folder: first 90% / last 10% of its lines; builtin: the last 8 topics."""
    if data == "wikitext2":
        root = download(data, DATASETS[data])
        if root is not None:
            return data, read_text(root / "train.txt"), read_text(root / "valid.txt")
        log0("offline: falling back to the built-in corpus (Python documentation) instead of wikitext2")
        data = "builtin"
    if data == "builtin":
        docs = builtin_text()
        return "builtin", "\n".join(docs[:-8]), "\n".join(docs[-8:])
    path = Path(data)
    if not path.exists():
        raise UserError(f"unknown dataset {data!r}: use wikitext2, builtin or a path to text")
    if path.is_dir() and (path / "train.txt").exists() and (path / "valid.txt").exists():
        return path.name, read_text(path / "train.txt"), read_text(path / "valid.txt")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise UserError(f"folder {path} holds no text files")
        text = "\n".join(read_text(p) for p in files)
    else:
        text = read_text(path)
    lines = text.splitlines()
    n = int(0.9 * len(lines))
    if n == 0 or n == len(lines):
        raise UserError(f"{path} has {len(lines)} lines; it needs at least 2 to split off validation text")
    return path.name, "\n".join(lines[:n]), "\n".join(lines[n:])


def sentence_stream(text: str) -> list[str]:
    """Every non-empty line as a sentence `<S> w1 .. wn </S>`, all concatenated (bilm-tf's packing)."""
    return [w for line in text.splitlines() if line.split() for w in ("<S>", *line.split(), "</S>")]


class WordTable:
    """Every word type seen (softmax vocabulary first), its character ids, and its softmax id (or <UNK>)."""

    def __init__(self, vocab: list[str], words):
        self.types = list(vocab) + sorted(set(words) - set(vocab))
        self.index = {w: i for i, w in enumerate(self.types)}
        self.chars = torch.tensor([token_chars(w) for w in self.types])  # (n_types, 50)
        self.softmax_id = torch.tensor([i if i < len(vocab) else SPECIAL_WORDS.index("<UNK>")
                                        for i in range(len(self.types))])

    def ids(self, words: list[str]) -> torch.Tensor:
        return torch.tensor([self.index[w] for w in words], dtype=torch.long)


def get_batch(fwd: torch.Tensor, bwd: torch.Tensor, table: WordTable, pos: int, unroll_steps: int) -> dict:
    """Window pos..pos+T of every row of the forward stream (B, N) and of the reversed stream: characters
    (B, T, 50) and the next word's softmax id (B, T); in the reversed stream the next word is the previous."""
    window = slice(pos, pos + unroll_steps)
    target = slice(pos + 1, pos + unroll_steps + 1)
    return {"fwd_chars": table.chars[fwd[:, window]], "fwd_targets": table.softmax_id[fwd[:, target]],
            "bwd_chars": table.chars[bwd[:, window]], "bwd_targets": table.softmax_id[bwd[:, target]]}


def stream_rows(ids: torch.Tensor, rows: int) -> torch.Tensor:
    """Cut a stream into `rows` contiguous rows (B, N): row b continues in the next batch's row b."""
    n = len(ids) // rows
    return ids[:rows * n].view(rows, n)


class StreamSampler:
    """Consecutive windows of each row of the two streams, so the carried LSTM state continues the text it
    ended on (truncated BPTT). Under DDP each rank reads its own shard. The data position is `pos`."""

    def __init__(self, ids: torch.Tensor, table: WordTable, batch_size: int, unroll_steps: int, rank=0, world=1):
        shard = len(ids) // world
        ids = ids[rank * shard:(rank + 1) * shard]
        self.fwd, self.bwd = stream_rows(ids, batch_size), stream_rows(ids.flip(0), batch_size)
        if self.fwd.size(1) <= unroll_steps + 1:
            raise UserError(f"training text has {len(ids)} words per rank, too few for {batch_size} rows of "
                            f"{unroll_steps + 1}; use more data or a smaller --batch_size or --unroll_steps")
        self.table, self.unroll_steps, self.pos = table, unroll_steps, 0

    def __next__(self) -> dict:
        if self.pos + self.unroll_steps + 1 > self.fwd.size(1):
            self.pos = 0  # next epoch: the rows start over, the state carries on
        batch = get_batch(self.fwd, self.bwd, self.table, self.pos, self.unroll_steps)
        self.pos += self.unroll_steps
        return batch

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


def eval_windows(ids: torch.Tensor, table: WordTable, batch_size: int, unroll_steps: int, max_windows: int):
    """The validation stream as rows, window after window (the state carried); max_windows per row (0 = all)."""
    fwd, bwd = stream_rows(ids, batch_size), stream_rows(ids.flip(0), batch_size)
    n = (fwd.size(1) - 1) // unroll_steps
    for i in range(min(n, max_windows) if max_windows else n):
        yield get_batch(fwd, bwd, table, i * unroll_steps, unroll_steps)


# -----------------------------------------------------------------------------------------------------
# Model (section 3.1): character CNN -> highway -> projection, then two LSTM stacks with projections


class Highway(nn.Module):
    """y = t * relu(W_T x + b_T) + (1 - t) * x with t = sigmoid(W_C x + b_C) (Srivastava et al. 2015, as
    bilm-tf's high(): its "carry" gate multiplies the transform branch). b_C starts at -2: mostly carry x."""

    def __init__(self, d: int):
        super().__init__()
        self.transform, self.carry = nn.Linear(d, d), nn.Linear(d, d)
        for lin in (self.transform, self.carry):
            nn.init.normal_(lin.weight, std=math.sqrt(1.0 / d))
        nn.init.zeros_(self.transform.bias)
        nn.init.constant_(self.carry.bias, -2.0)

    def forward(self, x):
        t = torch.sigmoid(self.carry(x))
        return t * F.relu(self.transform(x)) + (1 - t) * x


class CharCNN(nn.Module):
    """Context-free token representation x_k (section 3.1, Kim et al. 2016): characters (B, T, 50) -> (B, T, P)."""

    def __init__(self, cfg: Config):
        super().__init__()
        filters = parse_filters(cfg.filters)
        self.char_embed = nn.Embedding(N_CHARS, cfg.char_embed_dim, padding_idx=0)  # row 0: padding tokens
        self.convs = nn.ModuleList(nn.Conv1d(cfg.char_embed_dim, n, w) for w, n in filters)
        d = sum(n for _, n in filters)
        self.highways = nn.ModuleList(Highway(d) for _ in range(cfg.n_highway))
        self.proj = nn.Linear(d, cfg.proj_dim) if d != cfg.proj_dim else nn.Identity()
        nn.init.uniform_(self.char_embed.weight, -1.0, 1.0)  # bilm-tf's initialisers
        with torch.no_grad():
            self.char_embed.weight[0].zero_()
        for conv in self.convs:
            nn.init.uniform_(conv.weight, -0.05, 0.05)
            nn.init.zeros_(conv.bias)
        if isinstance(self.proj, nn.Linear):
            nn.init.normal_(self.proj.weight, std=math.sqrt(1.0 / d))
            nn.init.zeros_(self.proj.bias)

    def forward(self, chars):
        B = chars.size(0)
        # x_k depends on the token alone: compute it once per distinct token of the batch (U <= B*T)
        words, where = torch.unique(rearrange(chars, "b t c -> (b t) c"), dim=0, return_inverse=True)
        x = rearrange(self.char_embed(words), "u c e -> u e c")  # (U, E, 50)
        # each filter: valid convolution over the characters, max over positions, then ReLU
        h = torch.cat([F.relu(conv(x).max(dim=-1).values) for conv in self.convs], dim=-1)  # (U, F)
        for highway in self.highways:
            h = highway(h)
        return rearrange(self.proj(h)[where], "(b t) p -> b t p", b=B)  # (B, T, P)


class LstmProjection(nn.Module):
    """One layer, one direction: an LSTM with a projected, clipped output (Sak et al. 2014; TensorFlow's
    LSTMCell(num_proj, cell_clip, proj_clip)). Gates in PyTorch order (i, f, g, o):
        c_t = clip(f * c_{t-1} + i * g, +-cell_clip);  h_t = clip(W_p (o * tanh c_t), +-proj_clip)
    Padded steps (mask False) keep the previous state and output zeros."""

    def __init__(self, d_in: int, cfg: Config):
        super().__init__()
        H, P = cfg.lstm_dim, cfg.proj_dim
        self.cell_clip, self.proj_clip = cfg.cell_clip, cfg.proj_clip
        self.input_linear = nn.Linear(d_in, 4 * H, bias=False)
        self.state_linear = nn.Linear(P, 4 * H)
        self.proj = nn.Linear(H, P, bias=False)
        bound = math.sqrt(6.0 / (d_in + P + 4 * H))  # Glorot over TF's packed [W_x; W_h] (TF's default)
        nn.init.uniform_(self.input_linear.weight, -bound, bound)
        nn.init.uniform_(self.state_linear.weight, -bound, bound)
        nn.init.xavier_uniform_(self.proj.weight)
        with torch.no_grad():  # TF adds forget_bias 1.0 at run time; we store it in the bias
            self.state_linear.bias.zero_()
            self.state_linear.bias[H:2 * H] = 1.0

    def forward(self, x, mask, state):
        """x (B, T, D), mask (B, T), state (h (B, P), c (B, H)) -> outputs (B, T, P), final state."""
        h, c = state
        xw = self.input_linear(x)  # (B, T, 4H): the input half of every step at once
        padded = not bool(mask.all())  # packed pretraining windows have no padding: skip the masking
        outputs = []
        for t in range(x.size(1)):
            i, f, g, o = (xw[:, t] + self.state_linear(h)).float().chunk(4, dim=-1)  # the recurrence in fp32
            c_new = (torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)).clamp(-self.cell_clip, self.cell_clip)
            h_new = self.proj(torch.sigmoid(o) * torch.tanh(c_new)).float().clamp(-self.proj_clip, self.proj_clip)
            if padded:
                m = mask[:, t, None]
                c, h, h_new = torch.where(m, c_new, c), torch.where(m, h_new, h), h_new * m
            else:
                c, h = c_new, h_new
            outputs.append(h_new)
        return torch.stack(outputs, dim=1), (h, c)


class BiLM(nn.Module):
    """The biLM: a shared token representation, a forward and a backward stack of LstmProjection layers, and
    a softmax shared by both directions (section 3.1). Stateful (`stateful = True`) it starts every batch
    from the final state of the previous batch, per row, as bilm-tf and the released outputs do."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.token_embedder = CharCNN(cfg)
        self.stacks = nn.ModuleList(nn.ModuleList(LstmProjection(cfg.proj_dim, cfg) for _ in range(cfg.n_layers))
                                    for _ in ("forward", "backward"))
        self.softmax = nn.Linear(cfg.proj_dim, cfg.vocab_size) if cfg.vocab_size else None
        self.drop = nn.Dropout(cfg.dropout)
        self.stateful, self.state = False, None

    def reset_states(self):
        self.state = None

    def get_extra_state(self):  # the carried state goes into checkpoints with the weights
        return self.state

    def set_extra_state(self, state):
        self.state = state

    def embed_tokens(self, chars):
        """Characters (B, T, 50) -> token representations x (B, T, P), zero at padding, and the mask (B, T)."""
        mask = (chars > 0).any(-1)  # a padding token is all zeros
        return self.token_embedder(chars) * mask[..., None], mask

    def run_lms(self, fwd, bwd):
        """Both LMs, each over its own stream of (x, mask) in its own reading order. Returns, per direction,
        the L+1 layers [x, h_1, .., h_L], each (B, T, P)."""
        B = fwd[0].size(0)
        H, P = self.cfg.lstm_dim, self.cfg.proj_dim
        new_state, layers = [], []
        for d, ((x, mask), stack) in enumerate(zip((fwd, bwd), self.stacks)):
            out = [x]
            for j, layer in enumerate(stack):
                state = (x.new_zeros(B, P, dtype=torch.float32), x.new_zeros(B, H, dtype=torch.float32))
                if self.stateful and self.state is not None:
                    prev = self.state[d][j]
                    n = min(B, prev[0].size(0))  # rows beyond the stored ones start from zero
                    state = tuple(torch.cat([s[:n].to(z.device), z[n:]]) for s, z in zip(prev, state))
                inp = self.drop(x)
                h, final = layer(inp, mask, state)
                x = h + inp if self.cfg.residual and j > 0 else h  # residual from the second layer on
                out.append(x)
                new_state.append(tuple(s.detach() for s in final))  # truncated BPTT at the batch boundary
            layers.append(out)
        if self.stateful:
            L = self.cfg.n_layers
            self.state = [new_state[:L], new_state[L:]]
        return layers

    def forward(self, fwd_chars, bwd_chars, fwd_targets, bwd_targets):
        """The pretraining objective (eq. 3): the mean of the forward and backward LM cross-entropies."""
        if self.softmax is None:
            raise UserError("this biLM has no softmax (the released weights ship without one); it can embed "
                            "and serve a task but not be trained as a language model")
        fwd, bwd = self.run_lms(self.embed_tokens(fwd_chars), self.embed_tokens(bwd_chars))
        return 0.5 * (self.lm_loss(self.drop(fwd[-1]), fwd_targets) + self.lm_loss(self.drop(bwd[-1]), bwd_targets))

    def lm_loss(self, h, targets):
        """Cross-entropy of the shared softmax, in fp32; sampled softmax in training when n_negative is set."""
        h, targets = h.flatten(0, 1).float(), targets.flatten()
        W, b = self.softmax.weight.float(), self.softmax.bias.float()
        V, S = W.size(0), self.cfg.n_negative
        if not (self.training and 0 < S < V):
            return F.cross_entropy(h @ W.T + b, targets)
        sampled = log_uniform_sample(V, S, h.device)  # (S,) shared by the whole batch

        def log_expected(k):  # log of the expected number of times k is drawn in S draws
            return torch.log(S * torch.log1p(1.0 / (k.float() + 1)) / math.log(V + 1))

        true = (h * W[targets]).sum(-1) + b[targets] - log_expected(targets)  # (N,)
        neg = h @ W[sampled].T + b[sampled] - log_expected(sampled)  # (N, S)
        neg = neg.masked_fill(sampled[None, :] == targets[:, None], float("-inf"))  # accidental hits
        logits = torch.cat([true[:, None], neg], dim=1)
        return F.cross_entropy(logits, torch.zeros_like(targets))

    def activations(self, chars):
        """The biLM's representations of right-padded sentences (section 3.2): chars (B, T, 50) without
        boundaries -> layers (B, L+1, T, 2P) where layer 0 is [x; x] and layer j is [h_fwd_j; h_bwd_j], and
        the mask (B, T). `<S>`/`</S>` are added around each sentence and their outputs dropped, as ELMo does."""
        mask = (chars > 0).any(-1)
        lengths = mask.sum(1)
        B, T = mask.shape
        framed = chars.new_zeros(B, T + 2, MAX_CHARS)
        framed[:, 0] = torch.tensor(token_chars("<S>"))
        framed[:, 1:T + 1] = chars
        rows = torch.arange(B, device=chars.device)
        framed[rows, lengths + 1] = torch.tensor(token_chars("</S>"), device=chars.device)
        x, framed_mask = self.embed_tokens(framed)  # (B, T+2, P): computed once, shared by both LMs
        rev = reverse_index(lengths + 2, T + 2)[..., None].expand_as(x)  # each row reversed within its length
        fwd, bwd = self.run_lms((x, framed_mask), (x.gather(1, rev), framed_mask))
        bwd = [h.gather(1, rev) for h in bwd]  # back into reading order
        layers = torch.stack([torch.cat([f, b], dim=-1) for f, b in zip(fwd, bwd)], dim=1)  # (B, L+1, T+2, 2P)
        return layers[:, :, 1:T + 1] * mask[:, None, :, None], mask

    def flops_per_token(self) -> float:
        """Training FLOPs per token and direction pair: 6 x the multiply-adds of the char CNN (once), each
        direction's LSTM layers, and its softmax (full, or the sampled columns)."""
        cfg, filters = self.cfg, parse_filters(self.cfg.filters)
        d = sum(n for _, n in filters)
        cnn = sum(w * cfg.char_embed_dim * n * (MAX_CHARS - w + 1) for w, n in filters) + 2 * cfg.n_highway * d * d
        cnn += d * cfg.proj_dim
        lstm = cfg.n_layers * (2 * cfg.proj_dim * 4 * cfg.lstm_dim + cfg.lstm_dim * cfg.proj_dim)
        V = cfg.vocab_size if not 0 < cfg.n_negative < cfg.vocab_size else cfg.n_negative
        return 6.0 * (2 * cnn + 2 * lstm + 2 * cfg.proj_dim * V)


def log_uniform_sample(V: int, S: int, device=None) -> torch.Tensor:
    """S draws from TensorFlow's log-uniform (Zipf) sampler over a frequency-sorted vocabulary:
    Q(k) = log((k+2)/(k+1)) / log(V+1), drawn as floor(exp(u log(V+1))) - 1 with u ~ U[0, 1)."""
    return ((torch.rand(S, device=device) * math.log(V + 1)).exp() - 1).long().clamp(max=V - 1)


def reverse_index(lengths, T: int):
    """(B, T) gather index reversing each row's first lengths[b] positions and leaving the padding in place."""
    t = torch.arange(T, device=lengths.device)[None, :]
    return torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)


def build_model(cfg: Config) -> BiLM:
    return BiLM(cfg)


# -----------------------------------------------------------------------------------------------------
# Objective: the biLM's joint log-likelihood of both directions (eq. 3), in fp32


def pretrain_loss(model, batch: dict) -> torch.Tensor:
    return model(batch["fwd_chars"], batch["bwd_chars"], batch["fwd_targets"], batch["bwd_targets"])


# -----------------------------------------------------------------------------------------------------
# ELMo (section 3.2) and downstream use (section 3.3)


class ScalarMix(nn.Module):
    """ELMo^task = gamma * sum_j s_j h_j with s = softmax(w) (eq. 1); w starts at 0 and gamma at 1. With
    layer_norm, each layer is first normalised by one mean and variance over all unmasked elements of its
    batch tensor, without affine parameters (bilm-tf's _do_ln; not nn.LayerNorm)."""

    def __init__(self, n_layers: int, layer_norm: bool = False):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n_layers))
        self.gamma = nn.Parameter(torch.ones(()))
        self.layer_norm = layer_norm

    def forward(self, layers, mask):
        """layers (B, L+1, T, D), mask (B, T) -> (B, T, D)."""
        if self.layer_norm:
            m = mask[:, None, :, None].to(layers.dtype)
            n = m.sum() * layers.size(-1)
            mean = (layers * m).sum(dim=(0, 2, 3), keepdim=True) / n
            var = (((layers - mean) * m) ** 2).sum(dim=(0, 2, 3), keepdim=True) / n
            layers = (layers - mean) / torch.sqrt(var + 1e-12)
        s = self.w.softmax(0)
        return self.gamma * torch.einsum("l,bltd->btd", s, layers)

    def l2(self):
        return (self.w ** 2).sum()


class Elmo(nn.Module):
    """A frozen biLM and n independent scalar mixes over one pass of it, each followed by dropout."""

    def __init__(self, bilm: BiLM, n_mixes: int, dropout: float, layer_norm: bool):
        super().__init__()
        self.bilm = bilm.requires_grad_(False)
        self.mixes = nn.ModuleList(ScalarMix(bilm.cfg.n_layers + 1, layer_norm) for _ in range(n_mixes))
        self.drop = nn.Dropout(dropout)

    def train(self, mode=True):  # the biLM stays in evaluation mode: no dropout in the frozen model
        super().train(mode)
        self.bilm.eval()
        return self

    def forward(self, chars):
        """chars (B, T, 50) -> [ELMo_k (B, T, 2P) for each mix], mask (B, T)."""
        with torch.no_grad():
            layers, mask = self.bilm.activations(chars)
        return [self.drop(mix(layers, mask)) for mix in self.mixes], mask


class Classifier(nn.Module):
    """The task model: word vectors [x_k; ELMo_k] into a BiLSTM, ([h_k; ELMo'_k] with elmo_output), max
    pooling over the real tokens, dropout, a linear layer. Without a biLM it is the baseline."""

    def __init__(self, cfg: Config, n_words: int, n_classes: int, bilm: BiLM | None):
        super().__init__()
        self.embed = nn.Embedding(n_words, cfg.task_embed_dim, padding_idx=0)
        self.elmo = Elmo(bilm, 1 + cfg.elmo_output, cfg.task_dropout, cfg.layer_norm) if bilm else None
        d_elmo = 2 * bilm.cfg.proj_dim if bilm else 0
        self.lstm = nn.LSTM(cfg.task_embed_dim + d_elmo, cfg.task_hidden, batch_first=True, bidirectional=True)
        self.drop = nn.Dropout(cfg.task_dropout)
        self.elmo_output = bilm is not None and cfg.elmo_output
        self.head = nn.Linear(2 * cfg.task_hidden + (d_elmo if self.elmo_output else 0), n_classes)

    def forward(self, word_ids, chars, lengths):
        """word_ids (B, T), chars (B, T, 50), lengths (B,) -> logits (B, n_classes)."""
        T = word_ids.size(1)
        mask = torch.arange(T, device=word_ids.device)[None, :] < lengths[:, None]
        x = self.drop(self.embed(word_ids))  # (B, T, E)
        if self.elmo is not None:
            elmo, _ = self.elmo(chars)
            x = torch.cat([x, elmo[0].to(x.dtype)], dim=-1)  # input: [x_k; ELMo_k]
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        h, _ = nn.utils.rnn.pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=T)
        if self.elmo_output:
            h = torch.cat([h, elmo[1].to(h.dtype)], dim=-1)  # output: [h_k; ELMo'_k]
        pooled = h.masked_fill(~mask[..., None], float("-inf")).max(dim=1).values
        return self.head(self.drop(pooled))

    def l2(self):
        return sum(mix.l2() for mix in self.elmo.mixes) if self.elmo is not None else 0.0


def task_loss(model: Classifier, batch: dict, l2_coef: float) -> torch.Tensor:
    """Cross-entropy plus lambda ||w||^2 on the mix weights (section 3.2)."""
    core = getattr(model, "module", model)
    logits = model(batch["word_ids"], batch["chars"], batch["lengths"])
    return F.cross_entropy(logits.float(), batch["labels"]) + l2_coef * core.l2()


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


def encode_classification(rows, words: dict, labels: dict, split: str):
    """(tokens, word ids, label id) per example; words outside the task vocabulary map to <unk> (1)."""
    examples, unknown = [], 0
    for label, text in rows:
        if label not in labels:
            if split == "train":
                raise UserError(f"label {label!r} in the {split} data is not one of {sorted(labels)}")
            unknown += 1
        tokens = text.split()
        examples.append((tokens, [words.get(w, 1) for w in tokens], labels.get(label, -1)))
    if unknown:
        log0(f"warning: {unknown} {split} examples have labels unseen in training; counted as errors")
    return examples


def collate(examples, pad_id: int = 0) -> dict:
    T = max(len(ids) for _, ids, _ in examples)
    word_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    for i, (_, ids, _) in enumerate(examples):
        word_ids[i, :len(ids)] = torch.tensor(ids)
    return {"word_ids": word_ids, "chars": batch_chars([tokens for tokens, _, _ in examples]),
            "lengths": torch.tensor([len(ids) for _, ids, _ in examples]),
            "labels": torch.tensor([y for _, _, y in examples])}


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


def make_optimizer(model: nn.Module, lr, weight_decay, betas, eps, device) -> torch.optim.Optimizer:
    """The biLM: Adagrad as bilm-tf (its initial accumulator from the model's config). Task models: AdamW
    with decoupled weight decay on matrices only."""
    params = [p for p in model.parameters() if p.requires_grad]
    if isinstance(model, BiLM):
        return torch.optim.Adagrad(params, lr=lr, initial_accumulator_value=model.cfg.adagrad_init,
                                   weight_decay=weight_decay, eps=1e-10)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device.type == "cuda")


def lr_lambda(warmup: int, total: int, floor: float, shape: str):
    """Multiplier of the peak lr: linear warmup from 0, then constant (bilm-tf's Adagrad) or cosine decay to
    `floor` (min_lr / lr) at the end of the schedule."""
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        if shape == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
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


# Copied from gpt.py: run_training with gpt.py->elmo.py
def run_training(cfg: Config, stage: str, model: nn.Module, sampler, loss_fn, evaluate, total_steps: int,
                 lr: float, warmup: int, shape: str, extra: dict, tokens_per_step: int,
                 flops_per_token: float) -> dict:
    """The loop shared by pretraining and fine-tuning: AdamW + schedule, accumulation with DDP sync on the
    last micro-step, clipping, bf16/fp16 autocast, evaluation and atomic checkpoints, exact resume."""
    device, dtype, ctx = setup_device(cfg)
    rank, world = setup_ddp(device)
    out = Path(cfg.out_dir)
    model.to(device)
    opt = make_optimizer(model, lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), 1e-8, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total_steps, cfg.min_lr / cfg.lr
                                                             if shape == "cosine" else 0.0, shape))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step, best = 0, None
    if cfg.resume:
        ckpt = load_checkpoint(str(out / "ckpt.pt"))
        check_compatible(ckpt, cfg, "elmo.py")
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
                "script": "elmo.py", "stage": stage, "model": raw.state_dict(), "optimizer": opt.state_dict(),
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


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def pretrain(cfg: Config) -> dict:
    """Stage `pretrain`: the biLM on packed sentence streams with carried state (bilm-tf's recipe)."""
    seed_all(cfg.seed)
    name, train_text, val_text = load_lm_text(cfg.data)
    train_words, val_words = sentence_stream(train_text), sentence_stream(val_text)
    model, vocab = None, None
    if cfg.resume:
        vocab = load_checkpoint(str(Path(cfg.out_dir) / "ckpt.pt"))["vocab"]
    elif cfg.init_from:
        model, vocab, cfg = load_pretrained(cfg)
        if vocab is None:
            raise UserError(f"{cfg.init_from} has no softmax word vocabulary, so it cannot continue "
                            "pretraining; use it with embed or task")
    vocab = vocab or build_vocab(train_words, cfg.vocab_size)
    cfg = dataclasses.replace(cfg, vocab_size=len(vocab))
    model = model or build_model(cfg)
    table = WordTable(vocab, train_words + val_words)
    train_ids, val_ids = table.ids(train_words), table.ids(val_words)
    if len(val_ids) // cfg.batch_size <= cfg.unroll_steps + 1:
        raise UserError(f"validation text has {len(val_ids)} words, too few for {cfg.batch_size} rows of "
                        f"{cfg.unroll_steps + 1}; use more data or a smaller --batch_size or --unroll_steps")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    sampler = StreamSampler(train_ids, table, cfg.batch_size, cfg.unroll_steps, rank, world)
    model.stateful = True
    n_params = sum(p.numel() for p in model.parameters())
    unk = (table.softmax_id[train_ids] == 2).float().mean().item()
    log0(f"pretraining on {name}: {len(train_ids):,} train / {len(val_ids):,} val words, vocab {len(vocab)} "
         f"({unk:.1%} of training words <UNK>), {n_params / 1e6:.2f}M parameters "
         f"({(n_params - cfg.vocab_size * (cfg.proj_dim + 1)) / 1e6:.2f}M without the softmax)")

    def evaluate(m, device):
        saved = m.state  # the carried training state waits while the validation stream is read
        m.reset_states()
        total, count = 0.0, 0
        for b in eval_windows(val_ids, table, cfg.batch_size, cfg.unroll_steps, cfg.eval_batches):
            b = {k: v.to(device) for k, v in b.items()}
            total += pretrain_loss(m, b).item() * b["fwd_targets"].numel()
            count += b["fwd_targets"].numel()
        m.state = saved
        return {"loss": total / count, "ppl": math.exp(total / count)}

    return run_training(cfg, "pretrain", model, sampler, pretrain_loss, evaluate, cfg.total_steps, cfg.lr, 0,
                        cfg.schedule, {"vocab": vocab}, cfg.batch_size * cfg.unroll_steps * cfg.grad_accum * world,
                        model.flops_per_token())


def task(cfg: Config) -> dict:
    """Stage `task`: the BiLSTM classifier with ELMo from a frozen biLM (--init_from), or without it."""
    seed_all(cfg.seed)
    resume = Path(cfg.out_dir) / "ckpt.pt" if cfg.resume else None
    ckpt = load_checkpoint(str(resume)) if resume else None
    bilm = None
    if ckpt is not None and (ckpt["bilm_config"] is None) == cfg.use_elmo:
        raise UserError(f"{resume} was trained {'without' if cfg.use_elmo else 'with'} ELMo; "
                        f"resume it with --{'no-' if cfg.use_elmo else ''}use_elmo")
    if cfg.use_elmo:
        if ckpt is not None:
            bilm_cfg = dataclasses.replace(cfg, **ckpt["bilm_config"])
            bilm = build_model(bilm_cfg)
        elif not cfg.init_from:
            raise UserError("task with ELMo needs --init_from a pretrained biLM (ckpt.pt or "
                            "allennlp:OPTIONS_JSON,WEIGHTS_HDF5), or --no-use_elmo for the baseline")
        else:
            bilm, _, bilm_cfg = load_pretrained(cfg)
    name, train_rows, dev_rows = load_classification(cfg.task_data, cfg.seed)
    label_list = ckpt["labels"] if ckpt else sorted({label for label, _ in train_rows})
    labels = {label: i for i, label in enumerate(label_list)}
    word_list = ckpt["words"] if ckpt else ["<pad>", "<unk>"] + sorted({w for _, t in train_rows for w in t.split()})
    words = {w: i for i, w in enumerate(word_list)}
    train = encode_classification(train_rows, words, labels, "train")
    dev = encode_classification(dev_rows, words, labels, "dev")
    model = Classifier(cfg, len(word_list), len(labels), bilm)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    sampler = EpochSampler(train, cfg.task_batch_size, cfg.seed, rank, world)
    total = max(1, math.ceil(sampler.per_epoch * cfg.task_epochs))
    log0(f"task on {name}: {len(train)} train / {len(dev)} dev examples, labels {label_list}, {total} steps, "
         + (f"ELMo from a frozen {bilm_cfg.n_layers}-layer biLM" if bilm else "no ELMo (baseline)"))

    def evaluate(m, device):
        correct, loss_sum = 0, 0.0
        for i in range(0, len(dev), cfg.task_batch_size):
            b = {k: v.to(device) for k, v in collate(dev[i:i + cfg.task_batch_size]).items()}
            logits = m(b["word_ids"], b["chars"], b["lengths"])
            correct += (logits.argmax(-1) == b["labels"]).sum().item()
            known = b["labels"] >= 0
            if known.any():
                loss_sum += F.cross_entropy(logits.float()[known], b["labels"][known], reduction="sum").item()
        return {"loss": loss_sum / len(dev), "acc": correct / len(dev)}

    mean_len = sum(len(x) for _, x, _ in train) / len(train)
    n_task = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops = 6.0 * n_task + (bilm.flops_per_token() / 3 if bilm else 0.0)  # the frozen biLM runs forward only
    extra = {"labels": label_list, "words": word_list,
             "bilm_config": {k: getattr(bilm_cfg, k) for k in ARCH_FIELDS} if bilm else None}
    run_cfg = dataclasses.replace(cfg, lr=cfg.task_lr, min_lr=0.0, grad_clip=5.0)  # AllenNLP's ELMo configs
    return run_training(run_cfg, "task", model, sampler, lambda m, b: task_loss(m, b, cfg.l2_coef), evaluate,
                        total, cfg.task_lr, 0, "constant", extra,
                        round(cfg.task_batch_size * mean_len * cfg.grad_accum * world), flops)


# -----------------------------------------------------------------------------------------------------
# Pretrained weights: our checkpoints, and the released (TensorFlow-trained) ELMo weights


def load_pretrained(cfg: Config):
    """(BiLM, softmax vocabulary or None, cfg with its architecture) from --init_from."""
    if cfg.init_from.startswith("allennlp:"):
        return load_allennlp(cfg.init_from[len("allennlp:"):], cfg)
    ckpt = load_checkpoint(cfg.init_from)
    if ckpt.get("script") != "elmo.py":
        raise UserError(f"{cfg.init_from} was written by {ckpt.get('script', 'another program')}, not elmo.py")
    if ckpt["stage"] == "task":  # a classifier: take its biLM
        if ckpt["bilm_config"] is None:
            raise UserError(f"{cfg.init_from} is a classifier without ELMo; it holds no biLM")
        cfg = dataclasses.replace(cfg, **ckpt["bilm_config"])
        state = {k[len("elmo.bilm."):]: v for k, v in ckpt["model"].items() if k.startswith("elmo.bilm.")}
    else:
        cfg = dataclasses.replace(cfg, **{k: ckpt["config"][k] for k in ARCH_FIELDS})
        state = ckpt["model"]
    model = build_model(cfg)
    model.load_state_dict(state)
    model.reset_states()
    return model, ckpt.get("vocab"), cfg


def load_allennlp(spec: str, cfg: Config):
    """Build the biLM from an ELMo options file and load its TensorFlow-trained hdf5 weights. The
    conversions: kernels stored (in, out) are transposed; the characters get a zero row 0 for the +1 shift;
    LSTM gates go from TensorFlow's (i, j, f, o) to (i, f, g, o) with TensorFlow's run-time forget bias
    +1 stored; the highway keeps TensorFlow's convention (see Highway), so its weights load as they are."""
    options_path, _, weights_path = spec.partition(",")
    if not options_path or not weights_path:
        raise UserError("--init_from allennlp: needs OPTIONS_JSON,WEIGHTS_HDF5")
    try:
        import h5py
    except ImportError:
        raise UserError("reading the released ELMo weights needs the h5py package: pip install h5py") from None
    try:
        opts = json.loads(read_text(Path(options_path)))
        lstm, cnn = opts["lstm"], opts["char_cnn"]
        cfg = dataclasses.replace(
            cfg, char_embed_dim=cnn["embedding"]["dim"], filters=",".join(f"{w}x{n}" for w, n in cnn["filters"]),
            n_highway=cnn["n_highway"], n_layers=lstm["n_layers"], lstm_dim=lstm["dim"],
            proj_dim=lstm["projection_dim"], cell_clip=float(lstm.get("cell_clip") or math.inf),
            proj_clip=float(lstm.get("proj_clip") or math.inf), residual=bool(lstm.get("use_skip_connections")),
            vocab_size=0)
        ok = cnn.get("activation", "relu") == "relu" and cnn["max_characters_per_token"] == MAX_CHARS
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{options_path} is not an ELMo options file ({e.__class__.__name__}: {e})") from None
    if not ok:
        raise UserError(f"{options_path}: only relu character CNNs over {MAX_CHARS} characters are supported")
    model = build_model(cfg)
    H = cfg.lstm_dim
    if not Path(weights_path).is_file():
        raise UserError(f"weights file {weights_path} does not exist")
    try:
        f = h5py.File(weights_path, "r")
    except OSError:
        raise UserError(f"{weights_path} is not an hdf5 file") from None

    def put(param, name, convert=lambda w: w):
        if name not in f:
            raise UserError(f"{weights_path} has no weight {name}; do the options match the weights?")
        w = convert(torch.from_numpy(np.asarray(f[name], dtype=np.float32)))
        if w.shape != param.shape:
            raise UserError(f"{weights_path}: {name} gives shape {tuple(w.shape)}, expected {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(w)

    def tf_gates(w):  # blocks (i, j, f, o) along dim 0 -> (i, f, j, o)
        i, j, fg, o = w.split(H, dim=0)
        return torch.cat([i, fg, j, o])

    with f:
        cnn_ = model.token_embedder
        put(cnn_.char_embed.weight, "char_embed", lambda w: torch.cat([torch.zeros(1, w.size(1)), w]))
        for i, conv in enumerate(cnn_.convs):
            put(conv.weight, f"CNN/W_cnn_{i}", lambda w: rearrange(w[0], "w e n -> n e w"))
            put(conv.bias, f"CNN/b_cnn_{i}")
        for i, hw in enumerate(cnn_.highways):
            for part in ("transform", "carry"):
                put(getattr(hw, part).weight, f"CNN_high_{i}/W_{part}", lambda w: w.T)
                put(getattr(hw, part).bias, f"CNN_high_{i}/b_{part}")
        if isinstance(cnn_.proj, nn.Linear):
            put(cnn_.proj.weight, "CNN_proj/W_proj", lambda w: w.T)
            put(cnn_.proj.bias, "CNN_proj/b_proj")
        for d, stack in enumerate(model.stacks):
            for j, layer in enumerate(stack):
                prefix = f"RNN_{d}/RNN/MultiRNNCell/Cell{j}/LSTMCell/"
                D = layer.input_linear.in_features
                put(layer.input_linear.weight, prefix + "W_0", lambda w: tf_gates(w.T)[:, :D])
                put(layer.state_linear.weight, prefix + "W_0", lambda w: tf_gates(w.T)[:, D:])
                put(layer.state_linear.bias, prefix + "B",
                    lambda b: tf_gates(b + torch.cat([torch.zeros(2 * H), torch.ones(H), torch.zeros(H)])))
                put(layer.proj.weight, prefix + "W_P_0", lambda w: w.T)
    return model, None, cfg


# -----------------------------------------------------------------------------------------------------
# Stage `embed`: ELMo layers for every sentence of a text file (as AllenNLP's `elmo` command)


def embed(cfg: Config) -> dict:
    if not cfg.init_from:
        raise UserError("embed needs --init_from a pretrained biLM (ckpt.pt or allennlp:OPTIONS_JSON,WEIGHTS_HDF5)")
    if not cfg.embed_file:
        raise UserError("embed needs --embed_file: a text file with one whitespace-tokenised sentence per line")
    lines = read_text(Path(cfg.embed_file)).splitlines()
    for n, line in enumerate(lines, 1):
        if not line.split():
            raise UserError(f"{cfg.embed_file}:{n} is an empty sentence; remove empty lines")
    model, _, cfg = load_pretrained(cfg)
    # The vectors are what a user keeps: `auto` computes them in fp32 (bf16 would round them away from the
    # released model's); --dtype bfloat16 asks for the faster, rounded ones explicitly.
    device, _, ctx = setup_device(dataclasses.replace(cfg, dtype="float32" if cfg.dtype == "auto" else cfg.dtype))
    model.to(device).eval()
    arrays = {}
    with torch.no_grad(), ctx:
        for i in range(0, len(lines), cfg.batch_size):
            sentences = [line.split() for line in lines[i:i + cfg.batch_size]]
            layers, _ = model.activations(batch_chars(sentences).to(device))
            for k, words in enumerate(sentences):
                arrays[str(i + k)] = layers[k, :, :len(words)].float().cpu().numpy()  # (L+1, n, 2P)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import h5py
        path = out / "elmo.hdf5"
        with h5py.File(path.with_suffix(".tmp"), "w") as f:
            for key, a in arrays.items():
                f.create_dataset(key, data=a)
    except ImportError:
        path = out / "elmo.npz"
        with open(path.with_suffix(".tmp"), "wb") as f:
            np.savez(f, **arrays)
    os.replace(path.with_suffix(".tmp"), path)
    log0(f"wrote ELMo layers for {len(arrays)} sentences to {path}: one array (layers, tokens, "
         f"{2 * cfg.proj_dim}) per line, keyed by its line index from 0")
    return {"path": str(path), "sentences": len(arrays)}


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
        if stage == "embed":
            return embed(cfg)
        if stage == "task":
            return task(cfg)
        # the main job: pretrain the biLM, then the task classifier with ELMo and without it
        root = Path(cfg.out_dir)
        lm = pretrain(dataclasses.replace(cfg, out_dir=str(root / "pretrain")))
        ckpt = str(root / "pretrain" / "ckpt.pt")
        with_elmo = task(dataclasses.replace(cfg, out_dir=str(root / "task"), init_from=ckpt, resume=False))
        without = task(dataclasses.replace(cfg, out_dir=str(root / "baseline"), use_elmo=False, resume=False))
        summary = {"ppl": lm.get("ppl"), "acc_elmo": with_elmo.get("acc"), "acc_baseline": without.get("acc")}
        log0(f"biLM validation perplexity {summary['ppl']:.2f}; task dev accuracy with ELMo "
             f"{summary['acc_elmo']:.4f}, without {summary['acc_baseline']:.4f}")
        return summary
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
