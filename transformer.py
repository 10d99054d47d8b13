"""The Transformer: an encoder-decoder built on attention alone, trained to translate.

Paper: Ashish Vaswani, Noam Shazeer, Niki Parmar, Jakob Uszkoreit, Llion Jones, Aidan N. Gomez, Lukasz Kaiser,
Illia Polosukhin, "Attention Is All You Need", NeurIPS 2017, arXiv:1706.03762.

What this file reproduces
  - Section 3: encoder and decoder stacks of N layers; every sublayer is `LayerNorm(x + Dropout(Sublayer(x)))`
    (post-LN); multi-head scaled dot-product attention (eq. 1) in three kinds: encoder self-attention,
    masked decoder self-attention and encoder-decoder attention; the position-wise feed-forward network
    with ReLU (eq. 2); sinusoidal positional encodings (section 3.5); embeddings multiplied by sqrt(d_model)
    and one weight matrix shared by the source embedding, the target embedding and the pre-softmax linear
    transformation (section 3.4, with a shared BPE vocabulary).
  - Section 5: batches of sentence pairs of similar length holding about 25,000 source plus 25,000 target
    tokens (5.1); Adam with beta1 0.9, beta2 0.98, eps 1e-9 and lrate = d_model^-0.5 *
    min(step^-0.5, step * warmup^-1.5), warmup 4000 (5.3, eq. 3); dropout 0.1 on every sublayer output and
    on the embedding-plus-position sums, label smoothing 0.1 (5.4).
  - Section 6.1: beam search with beam 4 and length penalty alpha 0.6 (the GNMT form ((5+|Y|)/6)^alpha),
    maximum output length input length + 50, stopping early when every beam has ended; averaging the last
    checkpoints (the paper averages the last 5 for the base model); BLEU (here sacreBLEU's: 13a tokens).

Run it
  python transformer.py                          # main job: small preset on Multi30k de->en, then test BLEU
  python transformer.py train --data multi30k --out_dir out/m30k
  python transformer.py translate --init_from out/m30k/ckpt.pt < sentences.de
  python transformer.py average out/m30k/ckpt_*.pt --out_dir out/avg   # one loadable averaged checkpoint
  torchrun --nproc_per_node=2 transformer.py train ...                  # data parallel

Stages: `train` (the fields of sections 5.1-5.4), `translate` (the decoding fields; reads stdin), `average`
(takes checkpoint paths). The main job trains into out_dir/train, then prints translations of a few test
sentences and the test BLEU.

Data: `--data multi30k` (Multi30k task 1, German to English, raw cased text; downloaded once and checked),
a folder with {train,val,test}.{src,tgt} (`--src de --tgt en`; test may be named test_2016_flickr; a
missing test split is replaced by val), or `builtin`: a SYNTHETIC copy task generated here (the target is
the source, a random string of 8 digits), the task of the Annotated Transformer, used offline and in the
tests.

Deliberate deviations from the paper
  - Vocabulary: a shared byte-level BPE (GPT-2's form, as gpt.py) with <s>, </s> and <pad> as its last
    three ids, instead of the paper's 37k sentencepiece-style BPE; 8k tokens for Multi30k.
  - The source gets </s> appended (as fairseq does), so an empty line still has a key to attend to.
  - `norm_first=True` gives pre-LN sublayers `x + Dropout(Sublayer(LN(x)))` with a final LayerNorm on each
    stack: not the paper, but it trains without warmup trouble. Off by default and in all presets.
  - The paper does not state the initialisation: Linear weights are Xavier-uniform (as the Annotated
    Transformer and tensor2tensor), the shared embedding N(0, d_model^-0.5) so that after the sqrt(d_model)
    scale it has unit variance (as fairseq). LayerNorm eps 1e-6 (tensor2tensor's).
  - Smaller presets scale the warmup with their length: the paper warms up over 4000 of 100k steps (4%);
    `small` over 200 of its 600 steps (a few minutes of a 2-core CPU), `tiny` over 30 of 300. Since
    eq. 3 grows as d_model and warmup shrink, `lr_factor` (1 in the paper; the Annotated Transformer's
    `factor`) scales it down: 0.5 in `small`, 0.3 in `tiny`.
  - No attention dropout and no dropout after the ReLU: the paper has neither (tensor2tensor and the
    Annotated Transformer add both).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import gzip
import hashlib
import heapq
import json
import math
import os
import random
import re
import shutil
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
    # model: the base model of Table 3 (section 3)
    n_layer: int = 6  # N, in the encoder and in the decoder
    d_model: int = 512
    d_ff: int = 2048  # inner layer of the feed-forward networks (eq. 2)
    n_head: int = 8  # h; d_k = d_v = d_model / h = 64
    dropout: float = 0.1  # P_drop: sublayer outputs and embedding sums (section 5.4)
    norm_first: bool = False  # False: post-LN as the paper; True: pre-LN (a deviation, see the docstring)
    max_len: int = 256  # longest source or target in tokens (the sinusoid table)
    vocab_size: int = 0  # the shared BPE vocabulary with <s> </s> <pad> last; 0 = the tokenizer's size
    label_smoothing: float = 0.1  # epsilon_ls (section 5.4)
    # data and vocabulary (section 5.1)
    data: str = "multi30k"  # multi30k | builtin | a folder with {train,val,test}.{src,tgt}
    src: str = "de"
    tgt: str = "en"
    bpe_vocab_size: int = 37000  # shared source-target BPE, about 37,000 tokens for WMT En-De
    batch_tokens: int = 50000  # about 25,000 source + 25,000 target tokens per batch, padding included
    # optimizer and schedule (section 5.3): Adam, lrate = d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)
    warmup_steps: int = 4000
    lr_factor: float = 1.0  # multiplies eq. 3; 1 in the paper (the Annotated Transformer's `factor`)
    total_steps: int = 100_000  # the base model: 100,000 steps
    beta1: float = 0.9
    beta2: float = 0.98
    adam_eps: float = 1e-9
    weight_decay: float = 0.0  # the paper uses none
    grad_clip: float = 0.0  # the paper clips nothing; > 0 clips the gradient norm
    grad_accum: int = 1
    keep_checkpoints: int = 5  # copies ckpt_STEP.pt of the last k checkpoints, for `average` (section 6.1)
    # decoding (section 6.1)
    beam_size: int = 4  # 1 = greedy
    length_penalty: float = 0.6  # alpha of ((5 + |Y|) / 6)^alpha
    max_extra_len: int = 50  # maximum output length = input length + 50
    # run control
    out_dir: str = "out/transformer"
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    compile: bool = False
    seed: int = 1337
    eval_interval: int = 1000  # validation loss over the whole split, and a checkpoint
    log_interval: int = 100
    max_steps: int = 0  # stop this run early at this step (0 = run the whole schedule)
    resume: bool = False
    init_from: str = ""  # a checkpoint: its weights and vocabulary (train), or the model to translate with


PRESETS = {
    "paper": Config(),  # 6 + 6 layers, d_model 512: 63.1M parameters with a 37,000-token shared vocabulary
    "small": Config(n_layer=3, d_model=256, d_ff=1024, n_head=4, bpe_vocab_size=8000, batch_tokens=4000,
                    warmup_steps=200, lr_factor=0.5, total_steps=600, eval_interval=200, log_interval=20),
    "tiny": Config(n_layer=2, d_model=64, d_ff=128, n_head=4, dropout=0.0, max_len=64, bpe_vocab_size=300,
                   batch_tokens=1600, warmup_steps=30, lr_factor=0.3, total_steps=300, eval_interval=300,
                   log_interval=100, keep_checkpoints=2, beam_size=2),
}
ARCH_FIELDS = ("n_layer", "d_model", "d_ff", "n_head", "norm_first", "max_len", "vocab_size")
STAGES = ("train", "translate", "average")
SPECIALS = ("<s>", "</s>", "<pad>")  # the last three ids of the vocabulary: BOS, EOS, PAD


# Copied from gpt.py: UserError
class UserError(Exception):
    """Bad input: main() prints it as one line `error: ...` and exits with status 2."""


def validate(cfg: Config) -> None:
    for name in ("n_layer", "d_model", "d_ff", "n_head", "max_len", "batch_tokens", "total_steps",
                 "grad_accum", "beam_size", "eval_interval", "log_interval"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("vocab_size", "warmup_steps", "max_steps", "weight_decay", "grad_clip", "keep_checkpoints",
                 "max_extra_len", "length_penalty"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must not be negative, got {getattr(cfg, name)}")
    if cfg.d_model % cfg.n_head:
        raise UserError(f"--n_head {cfg.n_head} must divide --d_model {cfg.d_model}")
    if cfg.d_model % 2:
        raise UserError(f"--d_model must be even for the sin/cos positional encoding, got {cfg.d_model}")
    for name in ("dropout", "label_smoothing"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise UserError(f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    if cfg.warmup_steps == 0:
        raise UserError("--warmup_steps must be positive: the schedule divides by it (eq. 3)")
    if not (0 < cfg.beta1 < 1 and 0 < cfg.beta2 < 1 and cfg.adam_eps > 0 and cfg.lr_factor > 0):
        raise UserError("--beta1 and --beta2 must be in (0, 1), --adam_eps and --lr_factor positive")
    if cfg.bpe_vocab_size < 256 + len(SPECIALS):
        raise UserError(f"--bpe_vocab_size must be at least {256 + len(SPECIALS)} (bytes + specials)")
    if cfg.src == cfg.tgt:
        raise UserError(f"--src and --tgt must name different languages, both are {cfg.src!r}")
    if cfg.device not in ("auto", "cpu", "cuda", "mps") and not cfg.device.startswith("cuda:"):
        raise UserError(f"--device must be auto, cpu, cuda or mps, not {cfg.device!r}")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"--dtype must be auto, float32, bfloat16 or float16, not {cfg.dtype!r}")


# -----------------------------------------------------------------------------------------------------
# Vocabulary: one byte-level BPE learned over both languages (section 5.1's shared source-target BPE)

# GPT-2's pre-tokenizer (as gpt.py): BPE merges never cross these pieces.
PRETOKENIZE = re.compile(r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


# Copied from gpt.py: ByteBPE
class ByteBPE:
    """Byte-level BPE: every string is its UTF-8 bytes, merged pairwise in the order the merges were learned.

    `pieces[i]` are the bytes of token i: by default the 256 bytes, then one token per merge, then the
    special tokens. Training counts symbol pairs over word *types* weighted by their frequency and updates
    those counts incrementally after each merge (a heap with lazy deletion finds the most frequent pair),
    so a few thousand merges over WikiText-2 take seconds. Ties break towards the smaller pair of ids.
    """

    def __init__(self, merges: list, specials: tuple = (), pieces: list | None = None):
        if pieces is None:
            pieces = [bytes([b]) for b in range(256)]
            for a, b in merges:
                pieces.append(pieces[a] + pieces[b])
        self.merges, self.pieces = [tuple(m) for m in merges], list(pieces)
        id_of = {p: i for i, p in enumerate(self.pieces)}
        self.byte_ids = [id_of[bytes([b])] for b in range(256)]
        self.ranks = {(a, b): (r, id_of[self.pieces[a] + self.pieces[b]]) for r, (a, b) in enumerate(self.merges)}
        self.specials = {s: len(self.pieces) + i for i, s in enumerate(specials)}
        self.cache: dict[str, list[int]] = {}

    def __len__(self):
        return len(self.pieces) + len(self.specials)

    @classmethod
    def train(cls, text: str, vocab_size: int, specials: tuple = ()) -> "ByteBPE":
        words = Counter(PRETOKENIZE.findall(text))
        seqs = [list(w.encode("utf-8")) for w in words]
        freqs = list(words.values())
        pair_count: Counter = Counter()
        where: dict[tuple[int, int], set[int]] = {}
        for i, (s, f) in enumerate(zip(seqs, freqs)):
            for pair in zip(s, s[1:]):
                pair_count[pair] += f
                where.setdefault(pair, set()).add(i)
        heap = [(-c, p) for p, c in pair_count.items()]
        heapq.heapify(heap)
        merges = []
        while len(merges) < vocab_size - 256 - len(specials) and heap:
            neg, pair = heapq.heappop(heap)
            if pair_count.get(pair, 0) != -neg:
                continue  # a stale heap entry: its count changed since it was pushed
            new = 256 + len(merges)
            merges.append(pair)
            changed = set()
            for i in where.pop(pair):
                s, f = seqs[i], freqs[i]
                for p in zip(s, s[1:]):  # take this word's pairs out, merge, put the new ones in
                    pair_count[p] -= f
                    changed.add(p)
                seqs[i] = s = cls._merge(s, pair, new)
                for p in zip(s, s[1:]):
                    pair_count[p] += f
                    where.setdefault(p, set()).add(i)
                    changed.add(p)
            del pair_count[pair]
            for p in changed - {pair}:
                if pair_count[p] > 0:
                    heapq.heappush(heap, (-pair_count[p], p))
        return cls(merges, specials)

    @staticmethod
    def _merge(ids: list, pair: tuple, new: int) -> list:
        out, j = [], 0
        while j < len(ids):
            if j + 1 < len(ids) and ids[j] == pair[0] and ids[j + 1] == pair[1]:
                out.append(new)
                j += 2
            else:
                out.append(ids[j])
                j += 1
        return out

    def _encode_word(self, word: str) -> list[int]:
        ids = self.cache.get(word)
        if ids is None:
            ids = [self.byte_ids[b] for b in word.encode("utf-8")]
            while len(ids) > 1:  # apply the earliest-learned merge present, everywhere, as training did
                pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, (math.inf,))[0])
                if pair not in self.ranks:
                    break
                ids = self._merge(ids, pair, self.ranks[pair][1])
            self.cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        return [i for w in PRETOKENIZE.findall(text) for i in self._encode_word(w)]

    def decode(self, ids) -> str:
        names = {i: s.encode("utf-8") for s, i in self.specials.items()}
        data = b"".join(self.pieces[i] if i < len(self.pieces) else names.get(i, b"") for i in ids)
        return data.decode("utf-8", errors="replace")

    def state(self) -> dict:
        return {"kind": "bpe", "merges": self.merges, "specials": list(self.specials), "pieces": self.pieces}


def tokenizer_from_state(state: dict) -> ByteBPE:
    return ByteBPE(state["merges"], tuple(state["specials"]), state["pieces"])


# -----------------------------------------------------------------------------------------------------
# Data: Multi30k (downloaded once into a cache and checked), a local parallel corpus, the copy task

M30K = ("https://raw.githubusercontent.com/multi30k/dataset/a3d2e0d26b56f3846f66a952536ffed4e401d05a/"
        "data/task1/raw/")
DATASETS = {"multi30k": {f"{name}.gz": (M30K + f"{name}.gz", sha) for name, sha in (  # URLS.md
    ("train.de", "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6"),
    ("train.en", "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f"),
    ("val.de", "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a"),
    ("val.en", "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28"),
    ("test_2016_flickr.de", "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8"),
    ("test_2016_flickr.en", "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9"))}}


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


COPY_LEN = 8


def copy_task(n: int, seed: int) -> tuple[list[str], list[str]]:
    """The built-in SYNTHETIC task: strings of COPY_LEN random digits, to be copied (Annotated Transformer)."""
    rng = random.Random(seed)
    lines = [" ".join(rng.choice("0123456789") for _ in range(COPY_LEN)) for _ in range(n)]
    return lines, list(lines)


def read_parallel(folder: Path, split: str, src: str, tgt: str) -> tuple[list[str], list[str]]:
    """Line i of split.src translates line i of split.tgt; unequal line counts are an error."""
    a = read_text(folder / f"{split}.{src}").splitlines()
    b = read_text(folder / f"{split}.{tgt}").splitlines()
    if len(a) != len(b):
        raise UserError(f"{folder / f'{split}.{src}'} has {len(a)} lines but {folder / f'{split}.{tgt}'} has "
                        f"{len(b)}; a parallel corpus needs one translation per line")
    return a, b


def load_parallel(cfg: Config) -> tuple[str, dict]:
    """(name, {"train", "val", "test": (source lines, target lines)})."""
    if cfg.data == "multi30k":
        root = download("multi30k", DATASETS["multi30k"])
        if root is None:
            log0("offline: falling back to the built-in SYNTHETIC copy task instead of multi30k")
        else:
            for gz in DATASETS["multi30k"]:  # the raw files are published gzipped
                if not (root / gz[:-3]).exists():
                    (root / (gz[:-3] + ".part")).write_bytes(gzip.decompress((root / gz).read_bytes()))
                    os.replace(root / (gz[:-3] + ".part"), root / gz[:-3])
            return "multi30k", {s: read_parallel(root, f, cfg.src, cfg.tgt) for s, f in
                                (("train", "train"), ("val", "val"), ("test", "test_2016_flickr"))}
    if cfg.data in ("multi30k", "builtin"):
        log0("data: the built-in SYNTHETIC copy task (random digit strings; the target is the source)")
        return "builtin-copy", {"train": copy_task(4000, cfg.seed), "val": copy_task(200, cfg.seed + 1),
                                "test": copy_task(200, cfg.seed + 2)}
    folder = Path(cfg.data)
    if not folder.is_dir():
        raise UserError(f"unknown dataset {cfg.data!r}: use multi30k, builtin or a folder with "
                        f"train.{cfg.src}, train.{cfg.tgt}, val.{cfg.src}, val.{cfg.tgt} (and test.*)")
    splits = {s: read_parallel(folder, s, cfg.src, cfg.tgt) for s in ("train", "val")}
    test = next((t for t in ("test", "test_2016_flickr") if (folder / f"{t}.{cfg.src}").exists()), None)
    splits["test"] = read_parallel(folder, test, cfg.src, cfg.tgt) if test else splits["val"]
    if test is None:
        log0(f"{folder} has no test.{cfg.src}: reporting BLEU on the validation split")
    return folder.name, splits


def encode_pairs(tok: ByteBPE, lines: tuple[list[str], list[str]], max_len: int, split: str) -> list:
    """(source ids + </s>, <s> + target ids + </s>) per pair; a pair longer than max_len is an error."""
    bos, eos = tok.specials["<s>"], tok.specials["</s>"]
    pairs = []
    for n, (s, t) in enumerate(zip(*lines), 1):
        x, y = tok.encode(s) + [eos], [bos] + tok.encode(t) + [eos]
        if max(len(x), len(y) - 1) > max_len:
            raise UserError(f"{split} pair {n} has {max(len(x), len(y) - 1)} tokens, more than --max_len "
                            f"{max_len}; raise --max_len or remove the line")
        pairs.append((x, y))
    return pairs


def get_batch(pairs: list, pad_id: int) -> dict:
    """Right-padded src (B, S), decoder input tgt_in = <s> y (B, T) and targets tgt_out = y </s> (B, T)."""
    S, T = max(len(x) for x, _ in pairs), max(len(y) for _, y in pairs) - 1
    src = torch.full((len(pairs), S), pad_id, dtype=torch.long)
    tgt = torch.full((len(pairs), T + 1), pad_id, dtype=torch.long)
    for i, (x, y) in enumerate(pairs):
        src[i, :len(x)], tgt[i, :len(y)] = torch.tensor(x), torch.tensor(y)
    return {"src": src, "tgt_in": tgt[:, :-1], "tgt_out": tgt[:, 1:]}


class TokenBatches:
    """Section 5.1: pairs sorted by length (ties broken at random, seeded) and cut into batches of about
    batch_tokens source + target tokens, padding included. Each epoch shuffles the order of the batches
    (seed + epoch); under DDP every rank takes its own batches, the same number on each. The data position
    saved in checkpoints is (epoch, batch index)."""

    def __init__(self, pairs: list, batch_tokens: int, pad_id: int, seed: int, rank=0, world=1):
        rng = random.Random(seed)
        order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][0]), len(pairs[i][1]), rng.random()))
        self.batches, current, S, T = [], [], 0, 0
        for i in order:
            s, t = max(S, len(pairs[i][0])), max(T, len(pairs[i][1]))
            if current and (len(current) + 1) * (s + t) > batch_tokens:
                self.batches.append(current)
                current, s, t = [], len(pairs[i][0]), len(pairs[i][1])
            current.append(i)
            S, T = s, t
        self.batches.append(current)
        self.pairs, self.pad_id, self.seed, self.rank, self.world = pairs, pad_id, seed, rank, world
        self.per_epoch = len(self.batches) // world
        if self.per_epoch == 0:
            raise UserError(f"{len(self.batches)} batches cannot feed {world} ranks; lower --batch_tokens")
        self.epoch, self.index = 0, 0

    def __iter__(self):  # every batch once, in length order: evaluation
        return (get_batch([self.pairs[i] for i in b], self.pad_id) for b in self.batches)

    def __next__(self) -> dict:
        if self.index == self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        order = torch.randperm(len(self.batches), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        batch = self.batches[order[self.index * self.world + self.rank].item()]
        self.index += 1
        return get_batch([self.pairs[i] for i in batch], self.pad_id)

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state):
        self.epoch, self.index = state["epoch"], state["index"]


# -----------------------------------------------------------------------------------------------------
# Model (section 3)


def sinusoids(n_pos: int, d_model: int) -> torch.Tensor:
    """Section 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(same); (n_pos, d_model)."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    angle = pos / 10000 ** (torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (n_pos, d_model/2)
    pe = torch.zeros(n_pos, d_model, dtype=torch.float64)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(angle), torch.cos(angle)  # interleaved, not two halves
    return pe.float()


class MultiHeadAttention(nn.Module):
    """Section 3.2: MultiHead(Q, K, V) = Concat(head_1..head_h) W^O with head_i = Attention(Q W_i^Q, K W_i^K,
    V W_i^V) and Attention(Q, K, V) = softmax(Q K^T / sqrt(d_k)) V (eq. 1). With `record` set, the attention
    weights of the last call are kept in `weights` (B, H, T, S)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head = cfg.n_head
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.d_model, cfg.d_model) for _ in range(4))
        self.record, self.weights = False, None

    def forward(self, x, kv, mask=None, cache=None, static=False):
        """x (B, T, C) queries; kv (B, S, C) keys and values; mask broadcastable to (B, H, T, S), True where
        a query may look. cache: a dict holding k, v (B, H, S, d_k); a self-attention cache grows by the new
        positions, a static (encoder-decoder) one is computed once."""
        q = rearrange(self.q(x), "b t (h d) -> b h t d", h=self.n_head)
        if static and cache:
            k, v = cache["k"], cache["v"]
        else:
            k = rearrange(self.k(kv), "b s (h d) -> b h s d", h=self.n_head)
            v = rearrange(self.v(kv), "b s (h d) -> b h s d", h=self.n_head)
            if cache is not None:
                if cache:
                    k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        if self.record:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, T, S)
            if mask is not None:
                att = att.masked_fill(~mask, float("-inf"))
            self.weights = att.softmax(dim=-1)
            y = self.weights @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(rearrange(y, "b h t d -> b t (h d)"))  # (B, T, C)


class FeedForward(nn.Module):
    """Eq. 2: FFN(x) = max(0, x W_1 + b_1) W_2 + b_2, the same at every position."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.w_1, self.w_2 = nn.Linear(cfg.d_model, cfg.d_ff), nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x):
        return self.w_2(F.relu(self.w_1(x)))


class Sublayer(nn.Module):
    """Section 5.4: LayerNorm(x + Dropout(f(x))) (post-LN, the paper); x + Dropout(f(LayerNorm(x))) with
    norm_first."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model, eps=1e-6)
        self.drop = nn.Dropout(cfg.dropout)
        self.norm_first = cfg.norm_first

    def forward(self, x, f):
        if self.norm_first:
            return x + self.drop(f(self.norm(x)))
        return self.norm(x + self.drop(f(x)))


class EncoderLayer(nn.Module):
    """Section 3.1: self-attention, then the feed-forward network."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.self_attn, self.ff = MultiHeadAttention(cfg), FeedForward(cfg)
        self.sub_1, self.sub_2 = Sublayer(cfg), Sublayer(cfg)

    def forward(self, x, src_mask):  # (B, S, C), (B, 1, 1, S)
        x = self.sub_1(x, lambda h: self.self_attn(h, h, src_mask))
        return self.sub_2(x, self.ff)


class DecoderLayer(nn.Module):
    """Section 3.1: masked self-attention, encoder-decoder attention over the encoder output, feed-forward."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.self_attn, self.cross_attn, self.ff = MultiHeadAttention(cfg), MultiHeadAttention(cfg), FeedForward(cfg)
        self.sub_1, self.sub_2, self.sub_3 = Sublayer(cfg), Sublayer(cfg), Sublayer(cfg)

    def forward(self, y, memory, src_mask, tgt_mask, cache=None):  # (B, T, C), (B, S, C)
        y = self.sub_1(y, lambda h: self.self_attn(h, h, tgt_mask, None if cache is None else cache["self"]))
        y = self.sub_2(y, lambda h: self.cross_attn(h, memory, src_mask, None if cache is None else cache["cross"],
                                                    static=True))
        return self.sub_3(y, self.ff)


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.bos, self.eos, self.pad = cfg.vocab_size - 3, cfg.vocab_size - 2, cfg.vocab_size - 1  # SPECIALS
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)  # source, target and pre-softmax (3.4)
        self.register_buffer("pe", sinusoids(cfg.max_len, cfg.d_model), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layer))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
        self.enc_norm = nn.LayerNorm(cfg.d_model, eps=1e-6) if cfg.norm_first else nn.Identity()
        self.dec_norm = nn.LayerNorm(cfg.d_model, eps=1e-6) if cfg.norm_first else nn.Identity()
        for name, p in self.named_parameters():
            if name == "embed.weight":
                nn.init.normal_(p, std=cfg.d_model ** -0.5)
            elif p.dim() == 2:
                nn.init.xavier_uniform_(p)
            elif name.endswith(".bias") and ".norm" not in name:
                nn.init.zeros_(p)

    def embed_tokens(self, ids, start: int = 0):
        """Embedding * sqrt(d_model) + positional encoding, then dropout (sections 3.4, 3.5, 5.4)."""
        T = ids.size(1)
        if start + T > self.cfg.max_len:
            raise UserError(f"a sequence of {start + T} tokens is longer than --max_len {self.cfg.max_len}")
        return self.drop(self.embed(ids) * math.sqrt(self.cfg.d_model) + self.pe[start:start + T])

    def encode(self, src, src_mask=None):
        """src (B, S) -> memory (B, S, C) and the mask (B, 1, 1, S) of its real positions (default: not pad)."""
        if src_mask is None:
            src_mask = src != self.pad
        src_mask = src_mask[:, None, None, :]
        x = self.embed_tokens(src)
        for layer in self.encoder:
            x = layer(x, src_mask)
        return self.enc_norm(x), src_mask

    def decode(self, tgt_in, memory, src_mask, cache=None):
        """tgt_in (B, T) -> final decoder states (B, T, C). Position t sees target positions <= t only (the
        causal mask, combined with the target's padding); with a cache, tgt_in continues the cached positions."""
        T = tgt_in.size(1)
        start = cache[0]["self"]["k"].size(2) if cache and cache[0]["self"] else 0
        causal = torch.ones(T, start + T, dtype=torch.bool, device=tgt_in.device).tril(diagonal=start)
        tgt_mask = causal if cache is not None else causal & (tgt_in != self.pad)[:, None, None, :]
        y = self.embed_tokens(tgt_in, start)
        for i, layer in enumerate(self.decoder):
            y = layer(y, memory, src_mask, tgt_mask, None if cache is None else cache[i])
        return self.dec_norm(y)

    def forward(self, src, tgt_in, src_mask=None):
        """Next-token logits (B, T, V): decoder states times the shared embedding matrix (section 3.4)."""
        memory, src_mask = self.encode(src, src_mask)
        return self.decode(tgt_in, memory, src_mask) @ self.embed.weight.T

    def new_cache(self):
        return [{"self": {}, "cross": {}} for _ in self.decoder]

    def flops_per_token(self, src_len: float, tgt_len: float) -> float:
        """Training FLOPs per (source + target) token of a pair of mean lengths: 6 per weight per token that
        uses it (encoder weights: source tokens; decoder and output layer: target tokens) plus 12 d_model per
        query-key pair of every attention (PaLM appendix B's count)."""
        n_enc = sum(p.numel() for p in self.encoder.parameters()) + sum(p.numel() for p in self.enc_norm.parameters())
        n_dec = sum(p.numel() for p in self.parameters()) - n_enc  # the decoder and the shared output layer
        att = self.cfg.n_layer * self.cfg.d_model * (src_len ** 2 + tgt_len ** 2 + src_len * tgt_len)
        return (6 * (n_enc * src_len + n_dec * tgt_len) + 12 * att) / (src_len + tgt_len)


def build_model(cfg: Config) -> Transformer:
    if cfg.vocab_size <= len(SPECIALS):
        raise UserError("--vocab_size must be positive (it is set from the tokenizer when data is loaded)")
    return Transformer(cfg)


# -----------------------------------------------------------------------------------------------------
# Objective (section 5.4): label-smoothed cross-entropy over the non-pad target tokens, in fp32


def smoothed_targets(targets, vocab_size: int, epsilon: float, pad_id: int) -> torch.Tensor:
    """q = (1 - eps) one_hot(y) + eps * uniform over the V - 1 non-pad tokens (Szegedy et al. 2016); (N, V).
    Rows of pad targets are zero: they are not predicted."""
    q = torch.full((targets.numel(), vocab_size), epsilon / (vocab_size - 1), device=targets.device)
    q[:, pad_id] = 0.0
    q[torch.arange(targets.numel()), targets.flatten()] += 1.0 - epsilon
    return q.masked_fill((targets.flatten() == pad_id)[:, None], 0.0)


def label_smoothed_loss(logits, targets, epsilon: float, pad_id: int) -> torch.Tensor:
    """Mean over non-pad targets of KL(q || p), computed without building q: the cross-entropy
    (1 - eps) NLL + eps mean_{k != pad}(-log p_k) minus q's entropy (a constant)."""
    keep = targets.flatten() != pad_id
    logp = F.log_softmax(logits.float().flatten(0, 1)[keep], dim=-1)  # (N, V)
    V = logp.size(-1)
    nll = -logp.gather(1, targets.flatten()[keep][:, None]).squeeze(1)
    uniform = -(logp.sum(-1) - logp[:, pad_id]) / (V - 1)
    hi, lo = torch.tensor(1.0 - epsilon + epsilon / (V - 1)), torch.tensor(epsilon / (V - 1))
    entropy = -(torch.xlogy(hi, hi) + (V - 2) * torch.xlogy(lo, lo))
    return ((1.0 - epsilon) * nll + epsilon * uniform).mean() - entropy.to(logp.device)


def pretrain_loss(model, batch: dict) -> torch.Tensor:
    logits = model(batch["src"], batch["tgt_in"])
    m = model.module if hasattr(model, "module") else model
    m = getattr(m, "_orig_mod", m)
    return label_smoothed_loss(logits, batch["tgt_out"], m.cfg.label_smoothing, m.pad)


# -----------------------------------------------------------------------------------------------------
# Downstream: translation by greedy and beam search (section 6.1), and BLEU


def next_token_logits(model: Transformer, last, memory, src_mask, cache) -> torch.Tensor:
    """Logits (N, V) of the token after `last` (N, 1) in fp32; <s> and <pad> are never generated."""
    logits = (model.decode(last, memory, src_mask, cache)[:, -1] @ model.embed.weight.T).float()
    logits[:, [model.bos, model.pad]] = float("-inf")
    return logits


@torch.no_grad()
def greedy_decode(model: Transformer, src, max_extra: int = 50) -> list[list[int]]:
    """The most probable next token at each step, for a batch of sources (B, S); the encoder runs once and
    the decoder's self-attention keys and values are cached. Outputs exclude <s> and </s>."""
    memory, src_mask = model.encode(src)
    B, src_len = src.size(0), src_mask.sum((1, 2, 3)) - 1  # real source tokens, without </s>
    limit = torch.clamp(src_len + max_extra, max=model.cfg.max_len)
    out = torch.full((B, 1), model.bos, device=src.device)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    cache = model.new_cache()
    for t in range(int(limit.max())):
        nxt = next_token_logits(model, out[:, -1:], memory, src_mask, cache).argmax(-1).masked_fill(done, model.pad)
        out = torch.cat([out, nxt[:, None]], dim=1)
        done |= (nxt == model.eos) | (t + 1 >= limit)
        if done.all():
            break
    return [[i for i in row[1:] if i not in (model.eos, model.pad)] for row in out.tolist()]


def gnmt_penalty(length: int, alpha: float) -> float:
    """Wu et al. 2016, eq. 14: lp(Y) = ((5 + |Y|) / 6)^alpha."""
    return ((5 + length) / 6) ** alpha


@torch.no_grad()
def beam_search(model: Transformer, src, beam: int = 4, alpha: float = 0.6, max_extra: int = 50) -> list[list[int]]:
    """Beam search for a batch of sources (B, S): B*beam hypotheses decoded together, the encoder run once,
    the self-attention keys and values cached and reordered as beams are chosen. Each step ranks the 2*beam
    best extensions: those among the best `beam` that end in </s> become finished hypotheses scored
    log P / lp(|Y|) (|Y| counts </s>), the best `beam` that do not end stay alive (as fairseq). A sentence
    stops when it has `beam` finished hypotheses or reaches its maximum length (input length + max_extra),
    where its alive hypotheses are finished as they are. Returns the best finished hypothesis of each
    sentence, without <s> and </s>."""
    memory, src_mask = model.encode(src)
    B, K, dev = src.size(0), beam, src.device
    limit = torch.clamp(src_mask.sum((1, 2, 3)) - 1 + max_extra, max=model.cfg.max_len).tolist()
    memory, src_mask = memory.repeat_interleave(K, 0), src_mask.repeat_interleave(K, 0)  # (B*K, S, C)
    seqs = torch.full((B * K, 1), model.bos, device=dev)
    scores = torch.zeros(B, K, device=dev)
    scores[:, 1:] = float("-inf")  # all beams start as the same hypothesis: expand only the first
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    active = [True] * B
    cache = model.new_cache()
    for t in range(1, int(max(limit)) + 1):
        logp = F.log_softmax(next_token_logits(model, seqs[:, -1:], memory, src_mask, cache), dim=-1)  # (B*K, V)
        V = logp.size(-1)
        cand = (scores[:, :, None] + rearrange(logp, "(b k) v -> b k v", k=K)).flatten(1)  # (B, K*V)
        top, idx = cand.topk(2 * K, dim=-1)  # (B, 2K)
        token, origin = idx % V, idx // V
        ends = token == model.eos
        for b in range(B):
            if not active[b]:
                continue
            for j in (ends[b, :K] & torch.isfinite(top[b, :K])).nonzero().flatten().tolist():
                if len(finished[b]) < K:
                    hyp = seqs[b * K + origin[b, j], 1:].tolist()
                    finished[b].append((top[b, j].item() / gnmt_penalty(len(hyp) + 1, alpha), hyp))
        # the best K extensions that do not end stay alive
        rank = torch.arange(2 * K, device=dev) + 2 * K * ends
        keep = rank.topk(K, dim=-1, largest=False).indices  # (B, K)
        scores = top.gather(1, keep).masked_fill(ends.gather(1, keep), float("-inf"))
        rows = (torch.arange(B, device=dev)[:, None] * K + origin.gather(1, keep)).flatten()  # (B*K,)
        seqs = torch.cat([seqs[rows], token.gather(1, keep).flatten()[:, None]], dim=1)
        for layer in cache:
            layer["self"]["k"], layer["self"]["v"] = layer["self"]["k"][rows], layer["self"]["v"][rows]
        for b in range(B):
            if active[b] and (len(finished[b]) >= K or t >= limit[b]):
                active[b] = False
                if t >= limit[b] and len(finished[b]) < K:  # out of length: finish the alive ones as they are
                    for k in range(K):
                        if torch.isfinite(scores[b, k]):
                            hyp = seqs[b * K + k, 1:].tolist()
                            finished[b].append((scores[b, k].item() / gnmt_penalty(len(hyp), alpha), hyp))
        if not any(active):
            break
    return [max(f, key=lambda h: h[0])[1] if f else [] for f in finished]


def translate_lines(model: Transformer, tok: ByteBPE, lines: list[str], beam: int, alpha: float, max_extra: int,
                    device, batch_size: int = 64) -> list[str]:
    """Translate sentences in batches of similar length; beam 1 is greedy search."""
    ids = [tok.encode(s) + [model.eos] for s in lines]
    for n, x in enumerate(ids, 1):
        if len(x) > model.cfg.max_len:
            raise UserError(f"input line {n} has {len(x)} tokens, more than the model's max_len "
                            f"{model.cfg.max_len}; split it")
    order, out = sorted(range(len(ids)), key=lambda i: len(ids[i])), [""] * len(ids)
    model.eval()
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        src = get_batch([(ids[j], [0]) for j in chunk], model.pad)["src"].to(device)
        hyps = greedy_decode(model, src, max_extra) if beam == 1 else beam_search(model, src, beam, alpha, max_extra)
        for j, h in zip(chunk, hyps):
            out[j] = tok.decode(h)
    return out


# BLEU as sacreBLEU computes it by default: mteval-v13a tokens, 4-grams, exponential smoothing of zero counts.
TOKENIZE_13A = [(re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "), (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
                (re.compile(r"([\.,])([^0-9])"), r" \1 \2"), (re.compile(r"([0-9])(-)"), r"\1 \2 ")]


def tokenize_13a(line: str) -> list[str]:
    line = line.rstrip().replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        line = line.replace(entity, char)
    line = f" {line} "
    for pattern, repl in TOKENIZE_13A:
        line = pattern.sub(repl, line)
    return line.split()


def corpus_bleu(hyps: list[str], refs: list[str]) -> float:
    """Corpus BLEU (Papineni et al. 2002) in 0-100 against one reference per sentence."""
    correct, total, sys_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for h, r in zip(hyps, refs):
        h, r = tokenize_13a(h), tokenize_13a(r)
        sys_len, ref_len = sys_len + len(h), ref_len + len(r)
        for n in range(1, 5):
            h_grams = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            r_grams = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            correct[n - 1] += sum(min(c, r_grams[g]) for g, c in h_grams.items())
            total[n - 1] += max(0, len(h) - n + 1)
    if not any(correct) or not all(total):
        return 0.0
    log_p, smooth = 0.0, 1.0
    for c, t in zip(correct, total):
        if c == 0:  # sacreBLEU's "exp" smoothing: 1 / (2^k * total) for the k-th zero count
            smooth *= 2
        log_p += math.log(100.0 * c / t if c else 100.0 / (smooth * t))
    bp = 1.0 if sys_len >= ref_len else math.exp(1 - ref_len / sys_len)
    return bp * math.exp(log_p / 4)


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


def noam_lambda(warmup: int):
    """Eq. 3 divided by its factor d_model^-0.5 (the optimizer's base rate): min(step^-0.5, step *
    warmup^-1.5), where step counts updates from 1 (the scheduler counts them from 0)."""
    return lambda s: min((s + 1) ** -0.5, (s + 1) * warmup ** -1.5)


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


def run_training(cfg: Config, stage: str, model: nn.Module, sampler, loss_fn, evaluate, extra: dict,
                 tokens_per_step: int, flops_per_token: float) -> dict:
    """gpt.py's loop with the paper's optimizer: Adam(0.9, 0.98, 1e-9) and eq. 3's schedule; accumulation with
    DDP sync on the last micro-step, bf16/fp16 autocast, evaluation and atomic checkpoints (plus copies of
    the last keep_checkpoints of them, to average), exact resume."""
    device, dtype, ctx = setup_device(cfg)
    rank, world = setup_ddp(device)
    out = Path(cfg.out_dir)
    model.to(device)
    base_lr = cfg.lr_factor * cfg.d_model ** -0.5  # eq. 3's factor; LambdaLR multiplies the rest
    opt = make_optimizer(model, base_lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.adam_eps, device)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, noam_lambda(cfg.warmup_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step, best = 0, None
    if cfg.resume:
        ckpt = load_checkpoint(str(out / "ckpt.pt"))
        check_compatible(ckpt, cfg, "transformer.py")
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
                "script": "transformer.py", "stage": stage, "model": raw.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                "step": step, "data": data, "rng": rng or rng_state(), "config": dataclasses.asdict(cfg), "best": best,
                **extra})
            if cfg.keep_checkpoints:  # the paper averages the last 5 checkpoints (section 6.1)
                shutil.copyfile(out / "ckpt.pt", out / f"ckpt_{step:07d}.pt")
                for old in sorted(out.glob("ckpt_*.pt"))[:-cfg.keep_checkpoints]:
                    old.unlink()

    def run_eval():
        nonlocal best
        raw.eval()
        with torch.no_grad(), ctx:
            metrics = evaluate(raw, device)
        raw.train()
        best = metrics["loss"] if best is None else min(best, metrics["loss"])
        log(step=step, split="val", **metrics)
        return metrics

    t0 = t_last = time.time()
    at_step_start = (None, None)
    start_step, metrics = step, {}
    stop = min(cfg.total_steps, cfg.max_steps) if cfg.max_steps else cfg.total_steps
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
                last = f"the last good checkpoint is {out / 'ckpt.pt'}" if (out / "ckpt.pt").exists() else \
                    "no checkpoint was written yet"
                raise UserError(f"loss became {loss.item()} at step {step}; stopped, {last} (try a smaller "
                                "--lr_factor, more --warmup_steps or --norm_first)")
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
    return {"step": step, **metrics}


def load_trained(path: str, cfg: Config) -> tuple[Transformer, ByteBPE, Config]:
    """(model, tokenizer, cfg with the checkpoint's architecture) from a checkpoint of this script."""
    ckpt = load_checkpoint(path)
    if ckpt.get("script") != "transformer.py":
        raise UserError(f"{path} was written by {ckpt.get('script', 'another program')}, not transformer.py")
    cfg = dataclasses.replace(cfg, **{k: ckpt["config"][k] for k in ARCH_FIELDS})
    model = build_model(cfg)
    model.load_state_dict(ckpt["model"])
    return model, tokenizer_from_state(ckpt["tokenizer"]), cfg


def train(cfg: Config) -> dict:
    """Stage `train`: the shared BPE (or the checkpoint's), the model, then test BLEU with beam search."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    name, splits = load_parallel(cfg)
    model, tok = None, None
    if cfg.resume:
        tok = tokenizer_from_state(load_checkpoint(str(Path(cfg.out_dir) / "ckpt.pt"))["tokenizer"])
    elif cfg.init_from:
        model, tok, cfg = load_trained(cfg.init_from, cfg)
    if tok is None:
        t0 = time.time()
        tok = ByteBPE.train("\n".join(splits["train"][0] + splits["train"][1]), cfg.bpe_vocab_size, SPECIALS)
        log0(f"trained a shared byte-level BPE: {len(tok)} tokens in {time.time() - t0:.1f}s")
    if cfg.vocab_size and cfg.vocab_size != len(tok):
        raise UserError(f"--vocab_size {cfg.vocab_size} differs from the vocabulary's {len(tok)} tokens; leave it 0")
    cfg = dataclasses.replace(cfg, vocab_size=len(tok))
    model = model or build_model(cfg)
    train_pairs, val_pairs = (encode_pairs(tok, splits[s], cfg.max_len, s) for s in ("train", "val"))
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    sampler = TokenBatches(train_pairs, cfg.batch_tokens, model.pad, cfg.seed, rank, world)
    val = TokenBatches(val_pairs, cfg.batch_tokens, model.pad, cfg.seed)
    src_len = sum(len(x) for x, _ in train_pairs) / len(train_pairs)
    tgt_len = sum(len(y) - 1 for _, y in train_pairs) / len(train_pairs)
    log0(f"training on {name} {cfg.src}->{cfg.tgt}: {len(train_pairs):,} pairs in {len(sampler.batches)} batches, "
         f"{len(val_pairs):,} val pairs, vocab {len(tok)}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
         f"parameters, {'pre' if cfg.norm_first else 'post'}-LN")

    def evaluate(m, device):
        total, nll, count = 0.0, 0.0, 0
        for b in val:
            b = {k: v.to(device) for k, v in b.items()}
            n = (b["tgt_out"] != m.pad).sum().item()
            logits = m(b["src"], b["tgt_in"])
            total += label_smoothed_loss(logits, b["tgt_out"], cfg.label_smoothing, m.pad).item() * n
            nll += F.cross_entropy(logits.float().flatten(0, 1), b["tgt_out"].flatten(), ignore_index=m.pad,
                                   reduction="sum").item()
            count += n
        return {"loss": total / count, "nll": nll / count, "ppl": math.exp(nll / count)}

    metrics = run_training(cfg, "train", model, sampler, pretrain_loss, evaluate, {"tokenizer": tok.state()},
                           cfg.batch_tokens * cfg.grad_accum * world, model.flops_per_token(src_len, tgt_len))
    if rank == 0 and not metrics.get("interrupted"):
        device, _, ctx = setup_device(cfg)
        t0 = time.time()
        with ctx:
            hyps = translate_lines(model, tok, splits["test"][0], cfg.beam_size, cfg.length_penalty,
                                   cfg.max_extra_len, device)
        metrics["bleu"] = corpus_bleu(hyps, splits["test"][1])
        MetricsLog(Path(cfg.out_dir), rank)(step=metrics["step"], split="test", bleu=metrics["bleu"],
                                            beam=cfg.beam_size, seconds=round(time.time() - t0, 1))
        metrics["translations"] = list(zip(splits["test"][0], hyps, splits["test"][1]))
    log0("final " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                             if k != "translations"))
    return metrics


# -----------------------------------------------------------------------------------------------------
# Stages `translate` and `average`


def translate(cfg: Config, lines: list[str] | None = None) -> list[str]:
    """Translate stdin (or the given lines), one sentence per line, to stdout."""
    if not cfg.init_from:
        raise UserError("translate needs --init_from a checkpoint (out_dir/ckpt.pt)")
    model, tok, cfg = load_trained(cfg.init_from, cfg)
    device, _, ctx = setup_device(cfg)
    model.to(device)
    if lines is None:
        try:
            lines = sys.stdin.read().splitlines()
        except UnicodeDecodeError:
            raise UserError("standard input is not UTF-8 text") from None
    with ctx:
        out = translate_lines(model, tok, lines, cfg.beam_size, cfg.length_penalty, cfg.max_extra_len, device)
    for line in out:
        print(line, flush=True)
    return out


def average(cfg: Config, paths: list[str]) -> dict:
    """Stage `average`: the element-wise mean of the weights of several checkpoints of one model (the paper
    averages the last 5), written to out_dir/ckpt.pt with the first one's config and vocabulary."""
    if not paths:
        raise UserError("average needs checkpoint paths: python transformer.py average ckpt1.pt ckpt2.pt ...")
    out = Path(cfg.out_dir) / "ckpt.pt"
    if out.exists() and load_checkpoint(str(out)).get("stage") != "average":
        raise UserError(f"{out} is a training checkpoint; write the average elsewhere with --out_dir")
    ckpts = [load_checkpoint(p) for p in paths]
    first = ckpts[0]
    if first.get("script") != "transformer.py":
        raise UserError(f"{paths[0]} was written by {first.get('script', 'another program')}, not transformer.py")
    arch = Config(**{k: v for k, v in first["config"].items() if k in {f.name for f in dataclasses.fields(Config)}})
    for p, c in zip(paths[1:], ckpts[1:]):
        check_compatible(c, arch, "transformer.py")
        if c["tokenizer"] != first["tokenizer"]:
            raise UserError(f"{p} has a different vocabulary from {paths[0]}; average checkpoints of one run")
    state = {k: sum(c["model"][k].double() for c in ckpts).div(len(ckpts)).to(v.dtype)
             for k, v in first["model"].items()}
    save_checkpoint(out, {"script": "transformer.py", "stage": "average", "model": state, "config": first["config"],
                          "tokenizer": first["tokenizer"], "averaged": [str(p) for p in paths],
                          "step": max(c.get("step", 0) for c in ckpts)})
    log0(f"averaged {len(paths)} checkpoints into {out}")
    return {"path": str(out), "n": len(paths)}


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


def main(argv=None) -> dict | list:
    argv = list(sys.argv[1:] if argv is None else argv)
    paths = []
    if argv[:1] == ["average"]:  # `average ckpt1 ckpt2 ... [--flags]`: the paths come before any flag
        while len(argv) > 1 and not argv[1].startswith("-"):
            paths.append(argv.pop(1))
    stage, cfg = parse_config(argv, __doc__, STAGES, PRESETS)
    try:
        validate(cfg)
        if stage == "train":
            return train(cfg)
        if stage == "translate":
            return translate(cfg)
        if stage == "average":
            return average(cfg, paths)
        # the main job: train into out_dir/train, then show a few test translations and the test BLEU
        metrics = train(dataclasses.replace(cfg, out_dir=str(Path(cfg.out_dir) / "train")))
        for src, hyp, ref in metrics.get("translations", [])[:5]:
            log0(f"source     {src}\nreference  {ref}\ntranslated {hyp}\n")
        if "bleu" in metrics:
            log0(f"test BLEU {metrics['bleu']:.2f} (beam {cfg.beam_size}, sacreBLEU 13a)")
        return metrics
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
