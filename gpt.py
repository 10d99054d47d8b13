"""GPT: generative pre-training of a Transformer decoder, then discriminative fine-tuning.

Paper: Alec Radford, Karthik Narasimhan, Tim Salimans, Ilya Sutskever, "Improving Language Understanding
by Generative Pre-Training", OpenAI 2018 (no arXiv id; the official code is openai/finetune-transformer-lm).

What this file reproduces
  - Section 3.1: a 12-layer decoder-only Transformer with masked self-attention, learned position
    embeddings, GELU, post-LN blocks `n = LN(x + attn(x)); h = LN(n + mlp(n))`, no final LayerNorm, the
    LM head tied to the token embedding, N(0, 0.02) init, dropout 0.1 on embeddings, attention and
    residual branches (`arch="gpt1"`). `arch="gpt2"` is the pre-LN variant with a final LayerNorm and
    residual projections scaled by 1/sqrt(2 n_layer) that nanoGPT made familiar.
  - Section 4.1 pretraining: next-token cross-entropy, Adam with max lr 2.5e-4, linear warmup over 2000
    updates then cosine annealing to 0, decoupled weight decay 0.01 on matrices.
  - Sections 3.2-3.3 fine-tuning: `[start] text [extract]`, a linear head on the final hidden state of the
    extract token, loss L_clf + 0.5 L_LM, lr 6.25e-5, batch 32, 3 epochs, warmup over 0.2% of the steps
    then linear decay, classifier dropout 0.1.

Run it
  python gpt.py                                    # main job: small preset on tiny shakespeare + samples
  python gpt.py pretrain --data wikitext2 --out_dir out/wt2     # byte-level BPE language model
  python gpt.py finetune --init_from out/wt2/ckpt.pt --finetune_data sst2 --out_dir out/sst2
  python gpt.py sample --init_from out/gpt/pretrain/ckpt.pt --prompt "ROMEO:"
  torchrun --nproc_per_node=2 gpt.py pretrain ...  # data parallel
  python gpt.py sample --init_from hf:path/to/gpt2     # Hugging Face GPT-1 / GPT-2 weights

Stages and their hyperparameters: `pretrain` uses the plain fields (lr, batch_size, warmup_steps,
total_steps); `finetune` uses the `finetune_*` fields (the paper's section 4.1 values); `sample` uses the
sampling fields. The main job runs `pretrain` into out_dir/pretrain, then samples from it.

Deliberate deviations from the paper
  - Tokenizer: byte-level BPE (GPT-2's) instead of GPT-1's ftfy + spaCy + character BPE with `</w>`
    markers: it needs no external pre-tokenizer and round-trips any string. A few thousand merges here
    instead of 40,000, since the corpora are small. Tiny shakespeare uses characters, as nanoGPT does.
  - Embedding dropout is applied to the summed token+position embeddings (as Hugging Face does); the
    official code drops rows of the embedding matrix itself.
  - Data: BooksCorpus is not redistributable; the defaults are tiny shakespeare, WikiText-2 and, offline,
    the Python documentation topics that ship with every Python (pydoc_data).
  - Presets other than `paper` use fewer steps and smaller widths; the warmup is scaled with them.
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
    # model (section 3.1 and the official code: n_layer 12, n_head 12, n_embd 768, n_ctx 512)
    arch: str = "gpt1"  # gpt1: post-LN, no final LN (the paper); gpt2: pre-LN + final LN
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    block_size: int = 512  # context length n_ctx
    vocab_size: int = 0  # embedding rows; 0 = the tokenizer's size, larger pads (e.g. to a multiple of 64)
    dropout: float = 0.1  # embedding, attention and residual dropout, 0.1 each (section 4.1)
    bias: bool = True  # biases in Linear layers and LayerNorms (the paper has them)
    # tokenizer and data
    data: str = "shakespeare"  # shakespeare | wikitext2 | builtin | path to a text file or folder
    tokenizer: str = "auto"  # char | bpe | auto (char for shakespeare, byte-level BPE otherwise)
    bpe_vocab_size: int = 4096  # 256 bytes + merges + 3 special tokens (GPT-1: 40,478)
    # pretraining (section 4.1): Adam, max lr 2.5e-4, 2000 warmup updates, cosine to 0, batch 64 x 512
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 2.5e-4
    min_lr: float = 0.0
    warmup_steps: int = 2000
    total_steps: int = 100_000  # length of the schedule (the paper: 100 epochs of BooksCorpus)
    weight_decay: float = 0.01  # decoupled, on matrices only ("modified L2")
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # the official code's max_grad_norm
    # fine-tuning (sections 3.3 and 4.1)
    finetune_data: str = "sst2"  # sst2 | builtin | path to a folder with train.tsv and dev.tsv
    finetune_lr: float = 6.25e-5
    finetune_batch_size: int = 32
    finetune_epochs: int = 3
    finetune_warmup: float = 0.002  # fraction of the fine-tuning steps
    lm_coef: float = 0.5  # lambda of L3 = L2 + lambda * L1
    clf_dropout: float = 0.1
    # sampling
    prompt: str = "\n"
    num_samples: int = 3
    max_new_tokens: int = 300
    temperature: float = 0.8
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter
    # run control
    out_dir: str = "out/gpt"
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    compile: bool = False
    seed: int = 1337
    eval_interval: int = 500
    eval_batches: int = 20  # batches of the validation split per evaluation; 0 = the whole split
    log_interval: int = 50
    max_steps: int = 0  # stop this run early at this step (0 = run the whole schedule)
    resume: bool = False
    init_from: str = ""  # a checkpoint (ckpt.pt), or hf:DIR for Hugging Face GPT-1/GPT-2 weights


PRESETS = {
    "paper": Config(),
    "small": Config(n_layer=4, n_head=4, d_model=128, block_size=64, dropout=0.0, batch_size=24, lr=1e-3,
                    min_lr=1e-4, warmup_steps=100, total_steps=3000, weight_decay=0.1, beta2=0.99,
                    bpe_vocab_size=2048, eval_interval=500, log_interval=100, finetune_lr=1e-4),
    "tiny": Config(n_layer=2, n_head=2, d_model=32, block_size=32, dropout=0.1, batch_size=8, lr=3e-3,
                   warmup_steps=5, total_steps=40, bpe_vocab_size=300, eval_interval=20, eval_batches=4,
                   log_interval=10, num_samples=1, max_new_tokens=20, finetune_lr=1e-3,
                   finetune_batch_size=8, finetune_epochs=1),
}
ARCH_FIELDS = ("arch", "n_layer", "n_head", "d_model", "block_size", "vocab_size", "bias")
STAGES = ("pretrain", "sample", "finetune")


class UserError(Exception):
    """Bad input: main() prints it as one line `error: ...` and exits with status 2."""


def validate(cfg: Config) -> None:
    if cfg.arch not in ("gpt1", "gpt2"):
        raise UserError(f"--arch must be gpt1 or gpt2, not {cfg.arch!r}")
    for name in ("n_layer", "n_head", "d_model", "block_size", "batch_size", "grad_accum", "total_steps",
                 "finetune_batch_size", "finetune_epochs", "eval_interval", "log_interval"):
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("vocab_size", "warmup_steps", "max_steps", "eval_batches", "top_k", "weight_decay"):
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must not be negative, got {getattr(cfg, name)}")
    if cfg.d_model % cfg.n_head:
        raise UserError(f"--n_head {cfg.n_head} must divide --d_model {cfg.d_model}")
    for name in ("dropout", "clf_dropout"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise UserError(f"--{name} must be in [0, 1), got {getattr(cfg, name)}")
    if not 0.0 < cfg.top_p <= 1.0:
        raise UserError(f"--top_p must be in (0, 1], got {cfg.top_p}")
    if cfg.temperature < 0:
        raise UserError(f"--temperature must not be negative, got {cfg.temperature}")
    if not (cfg.lr > 0 and cfg.finetune_lr > 0 and 0 <= cfg.min_lr <= cfg.lr):
        raise UserError("learning rates must be positive, with 0 <= --min_lr <= --lr")
    if cfg.tokenizer not in ("auto", "char", "bpe"):
        raise UserError(f"--tokenizer must be auto, char or bpe, not {cfg.tokenizer!r}")
    if cfg.bpe_vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserError(f"--bpe_vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + specials)")
    if cfg.device not in ("auto", "cpu", "cuda", "mps") and not cfg.device.startswith("cuda:"):
        raise UserError(f"--device must be auto, cpu, cuda or mps, not {cfg.device!r}")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UserError(f"--dtype must be auto, float32, bfloat16 or float16, not {cfg.dtype!r}")


# -----------------------------------------------------------------------------------------------------
# Tokenizers: characters (tiny shakespeare, as nanoGPT) and byte-level BPE (GPT-2's form of GPT's BPE)

SPECIAL_TOKENS = ("<|start|>", "<|delimiter|>", "<|extract|>")  # section 3.3's input transformations


class CharTokenizer:
    """One id per character seen in training; characters never seen map to the unknown id 0."""

    def __init__(self, chars: list[str]):
        self.itos = ["\0"] + list(chars)  # id 0: unknown (never a character of the training text)
        self.stoi = {c: i for i, c in enumerate(self.itos) if i}
        self.unseen: Counter = Counter()

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text) - {"\0"}))

    def __len__(self):
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        ids = [self.stoi.get(c, 0) for c in text]
        if 0 in ids:
            self.unseen.update(c for c in text if c not in self.stoi)
        return ids

    def decode(self, ids) -> str:
        return "".join(self.itos[i] if 0 < i < len(self.itos) else "\ufffd" for i in ids)

    def state(self) -> dict:
        return {"kind": "char", "chars": self.itos[1:]}


# GPT-2's pre-tokenizer with the standard library's `re`: contractions, letters, digits, other symbols,
# whitespace; a space sticks to the word after it. BPE merges never cross these pieces. Same pieces as
# GPT-2's regex on ASCII; every character falls in exactly one class, so nothing is ever dropped.
PRETOKENIZE = re.compile(r"""'(?:[sdmt]|ll|ve|re)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


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


def tokenizer_from_state(state: dict):
    if state["kind"] == "char":
        return CharTokenizer(state["chars"])
    return ByteBPE(state["merges"], tuple(state["specials"]), state["pieces"])


# -----------------------------------------------------------------------------------------------------
# Data: named datasets downloaded once into a cache and checked, local files, and an offline fallback

DATASETS = {  # name -> {file: (pinned URL, sha256)}; ../shared/data/URLS.md lists where these come from
    "shakespeare": {"input.txt": (
        "https://raw.githubusercontent.com/karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e/"
        "data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed")},
    "wikitext2": {f"{s}.txt": (
        "https://raw.githubusercontent.com/pytorch/examples/77f55b912142e11fcfdf5b530231fb9c52f181e8/"
        f"word_language_model/data/wikitext-2/{s}.txt", h) for s, h in (
        ("train", "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f"),
        ("valid", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"),
        ("test", "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"))},
    "sst2": {f"{s}.tsv": (
        "https://raw.githubusercontent.com/eyalbd2/Reproducing-AutoPrompt/6288fb5bec9c572f2492875ae0111df5b6daed11/"
        f"glue_data/SST-2/{f}.tsv", h) for s, f, h in (  # train_full.tsv: that repo's train.tsv is a subset
        ("train", "train_full", "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1"),
        ("dev", "dev", "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0"))},
}


def log0(*args):
    """Print on rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, flush=True)


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


def builtin_text() -> list[str]:
    """The offline fallback corpus: the 79 Python documentation topics shipped in pydoc_data."""
    from pydoc_data.topics import topics
    return [topics[k] for k in sorted(topics)]


def load_lm_text(data: str) -> tuple[str, str, str]:
    """(name, train text, validation text) for pretraining. Splits are documented in the README:
    shakespeare and single files: first 90% / last 10% of the characters (as nanoGPT); wikitext2 and
    folders with train.txt + valid.txt: those files; builtin: the last 8 topics are validation."""
    if data in ("shakespeare", "wikitext2"):
        root = download(data, DATASETS[data])
        if root is None:
            log0(f"offline: falling back to the built-in corpus (Python documentation) instead of {data}")
            data = "builtin"
        elif data == "shakespeare":
            text = read_text(root / "input.txt")
            n = int(0.9 * len(text))
            return "shakespeare", text[:n], text[n:]
        else:
            return "wikitext2", read_text(root / "train.txt"), read_text(root / "valid.txt")
    if data == "builtin":
        docs = builtin_text()
        return "builtin", "\n".join(docs[:-8]), "\n".join(docs[-8:])
    path = Path(data)
    if not path.exists():
        raise UserError(f"unknown dataset {data!r}: use shakespeare, wikitext2, builtin or a path to text")
    if path.is_dir():
        if (path / "train.txt").exists() and (path / "valid.txt").exists():
            return path.name, read_text(path / "train.txt"), read_text(path / "valid.txt")
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise UserError(f"folder {path} holds no text files")
        text = "\n".join(read_text(p) for p in files)
    else:
        text = read_text(path)
    n = int(0.9 * len(text))
    return path.name, text[:n], text[n:]


def build_tokenizer(cfg: Config, name: str, train_text: str):
    kind = cfg.tokenizer if cfg.tokenizer != "auto" else ("char" if name == "shakespeare" else "bpe")
    if kind == "char":
        return CharTokenizer.train(train_text)
    t0 = time.time()
    tok = ByteBPE.train(train_text, cfg.bpe_vocab_size, SPECIAL_TOKENS)
    log0(f"trained byte-level BPE: {len(tok)} tokens in {time.time() - t0:.1f}s")
    return tok


class BlockSampler:
    """Random contiguous blocks (as nanoGPT and GPT's 512-token windows). Under DDP each rank draws from
    its own contiguous shard; its generator state is the data position saved in checkpoints."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, block_size: int, seed: int, rank=0, world=1):
        shard = len(tokens) // world
        self.tokens = tokens[rank * shard:(rank + 1) * shard] if world > 1 else tokens
        if len(self.tokens) <= block_size + 1:
            raise UserError(f"training text has {len(self.tokens)} tokens per rank, fewer than one block "
                            f"of {block_size + 1}; use more data or a smaller --block_size")
        self.batch_size, self.block_size = batch_size, block_size
        self.gen = torch.Generator().manual_seed(seed + rank)

    def __next__(self) -> dict:
        return get_batch(self.tokens, self.batch_size, self.block_size, self.gen)

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])


def get_batch(tokens: torch.Tensor, batch_size: int, block_size: int, generator=None) -> dict:
    """One batch of random contiguous blocks: input_ids (B, T) and targets shifted by one (B, T)."""
    starts = torch.randint(len(tokens) - block_size - 1, (batch_size,), generator=generator)
    block = torch.stack([tokens[s:s + block_size + 1] for s in starts.tolist()])
    return {"input_ids": block[:, :-1], "targets": block[:, 1:]}


def eval_batches(tokens: torch.Tensor, batch_size: int, block_size: int, max_batches: int):
    """Non-overlapping blocks of the split in order; at most max_batches of them evenly spread (0 = all)."""
    n = (len(tokens) - 1) // block_size
    starts = np.arange(n) * block_size
    if max_batches and n > max_batches * batch_size:
        starts = starts[np.linspace(0, n - 1, max_batches * batch_size).round().astype(int)]
    for i in range(0, len(starts), batch_size):
        block = torch.stack([tokens[s:s + block_size + 1] for s in starts[i:i + batch_size].tolist()])
        yield {"input_ids": block[:, :-1], "targets": block[:, 1:]}


# -----------------------------------------------------------------------------------------------------
# Model (section 3.1)


class CausalSelfAttention(nn.Module):
    """Masked multi-head self-attention with one fused QKV projection and an optional KV cache."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.attn_drop = nn.Dropout(cfg.dropout)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cache=None, need_weights=False):
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_head)
        if cache is not None:  # cache: [k, v] of earlier positions, extended in place
            if cache[0] is not None:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[0], cache[1] = k, v
        T, S = q.size(2), k.size(2)  # new queries attend to all S keys up to their own position
        causal = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
        p = self.attn_drop.p if self.training else 0.0
        if need_weights:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, T, S)
            att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            y = self.attn_drop(att) @ v
        else:
            att = None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if T == S else causal,
                                               is_causal=T == S, dropout_p=p)
        y = rearrange(y, "b h t d -> b t (h d)")
        return self.resid_drop(self.proj(y)), att


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))  # GELU, tanh form


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.pre_ln = cfg.arch == "gpt2"
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=1e-5, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=1e-5, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x, cache=None, need_weights=False):
        if self.pre_ln:  # GPT-2: x + f(LN(x))
            a, att = self.attn(self.ln_1(x), cache, need_weights)
            x = x + a
            return x + self.mlp(self.ln_2(x)), att
        a, att = self.attn(x, cache, need_weights)  # GPT-1: n = LN(x + a); h = LN(n + m)
        n = self.ln_1(x + a)
        return self.ln_2(n + self.mlp(n)), att


class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=1e-5, bias=cfg.bias) if cfg.arch == "gpt2" else None
        self.apply(self._init_weights)
        if cfg.arch == "gpt2":  # GPT-2: residual projections scaled by 1/sqrt(2 n_layer)
            for name, p in self.named_parameters():
                if name.endswith("proj.weight"):
                    nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)  # N(0, 0.02), section 4.1
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def hidden(self, idx, cache=None, need_weights=False):
        """Final hidden states h_n (B, T, C); with a cache, idx continues the cached positions."""
        B, T = idx.shape
        start = 0 if cache is None or cache[0][0] is None else cache[0][0].size(2)
        if start + T > self.cfg.block_size:
            raise UserError(f"sequence of {start + T} tokens is longer than the context of "
                            f"{self.cfg.block_size}; use --block_size or a shorter input")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # h_0 = U W_e + W_p   (B, T, C)
        atts = []
        for i, block in enumerate(self.blocks):
            x, att = block(x, None if cache is None else cache[i], need_weights)
            atts.append(att)
        if self.ln_f is not None:
            x = self.ln_f(x)
        return (x, atts) if need_weights else x

    def forward(self, idx, cache=None):
        """Next-token logits (B, T, V): h_n W_e^T, the output layer tied to the token embedding."""
        return self.hidden(idx, cache) @ self.wte.weight.T

    def new_cache(self):
        return [[None, None] for _ in self.blocks]

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6N for the weights plus 12 L T C for attention (PaLM appendix B)."""
        n = sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()
        return 6 * n + 12 * self.cfg.n_layer * self.cfg.block_size * self.cfg.d_model


def build_model(cfg: Config) -> GPT:
    if cfg.vocab_size <= 0:
        raise UserError("--vocab_size must be positive (it is set from the tokenizer when data is loaded)")
    return GPT(cfg)


# -----------------------------------------------------------------------------------------------------
# Objective: next-token cross-entropy (L1, eq. 1), in fp32 even under autocast


def pretrain_loss(model, batch: dict) -> torch.Tensor:
    logits = model(batch["input_ids"])
    return F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten())


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature=1.0, top_k=0, top_p=1.0,
             use_cache=True, generator=None) -> torch.Tensor:
    """Extend idx (B, T) by max_new_tokens; temperature 0 is greedy. With the KV cache each step feeds one
    token. Once the context is full the window slides, and learned absolute positions then need a fresh
    pass over the last block_size tokens, exactly what the uncached path computes."""
    was_training = model.training
    model.eval()
    block, cache = model.cfg.block_size, None
    for _ in range(max_new_tokens):
        if cache is not None and cache[0][0].size(2) < block:
            logits = model(idx[:, -1:], cache)
        else:
            cache = model.new_cache() if use_cache else None
            logits = model(idx[:, -block:], cache)
        logits = logits[:, -1, :].float()
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            nxt = torch.multinomial(filter_logits(logits / temperature, top_k, top_p).softmax(-1), 1,
                                    generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
    model.train(was_training)
    return idx


def filter_logits(logits, top_k=0, top_p=1.0):
    """Keep the top_k largest logits and the smallest set whose probability reaches top_p."""
    if top_k:
        kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # tokens after the mass already reached top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


# -----------------------------------------------------------------------------------------------------
# Downstream: classification fine-tuning (sections 3.2-3.3)


class GPTClassifier(nn.Module):
    """[start] text [extract] -> the final hidden state at the extract token -> dropout -> linear (W_y)."""

    def __init__(self, gpt: GPT, n_classes: int, clf_dropout: float):
        super().__init__()
        self.gpt = gpt
        self.drop = nn.Dropout(clf_dropout)
        self.head = nn.Linear(gpt.cfg.d_model, n_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids, lengths):
        """ids (B, T) right-padded; lengths (B,) count real tokens, the last one being [extract].
        Causal attention means real positions never see the padding after them."""
        h = self.gpt.hidden(ids)  # (B, T, C)
        h_extract = h[torch.arange(ids.size(0), device=ids.device), lengths - 1]  # (B, C)
        return self.head(self.drop(h_extract)), h @ self.gpt.wte.weight.T


def finetune_loss(model: GPTClassifier, batch: dict, lm_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """L3 = L2 + lambda * L1 (eq. 5): classification loss plus the auxiliary LM loss on the text tokens."""
    clf_logits, lm_logits = model(batch["input_ids"], batch["lengths"])
    clf = F.cross_entropy(clf_logits.float(), batch["labels"])
    T = batch["input_ids"].size(1)
    real = torch.arange(T - 1, device=clf_logits.device) < (batch["lengths"][:, None] - 1)
    lm_targets = batch["input_ids"][:, 1:].masked_fill(~real, -100)
    lm = F.cross_entropy(lm_logits[:, :-1].float().flatten(0, 1), lm_targets.flatten(), ignore_index=-100)
    return clf + lm_coef * lm, clf_logits


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


def encode_classification(rows, tok, labels: dict, block_size: int, split: str):
    """[start] text [extract] ids, truncated from the end of the text to fit the context."""
    start, extract = tok.specials["<|start|>"], tok.specials["<|extract|>"]
    examples, unknown = [], 0
    for label, text in rows:
        if label not in labels:
            if split == "train":
                raise UserError(f"label {label!r} in the {split} data is not one of {sorted(labels)}")
            unknown += 1
        ids = [start] + tok.encode(text)[:block_size - 2] + [extract]
        examples.append((ids, labels.get(label, -1)))
    if unknown:
        log0(f"warning: {unknown} {split} examples have labels unseen in training; counted as errors")
    return examples


def collate(examples, pad_id: int = 0) -> dict:
    T = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    for i, (x, _) in enumerate(examples):
        ids[i, :len(x)] = torch.tensor(x)
    return {"input_ids": ids, "lengths": torch.tensor([len(x) for x, _ in examples]),
            "labels": torch.tensor([y for _, y in examples])}


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


def setup_ddp(device: torch.device) -> tuple[int, int]:
    """(rank, world size); under torchrun, joins the process group (NCCL on CUDA, Gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)  # one group for all of a main job's stages
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def make_optimizer(model: nn.Module, lr, weight_decay, betas, eps, device) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay on matrices only (no decay on biases, LayerNorms)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device.type == "cuda")


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


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: write a temporary file, fsync it, then rename over the old checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({e.__class__.__name__})") from None


def check_compatible(ckpt: dict, cfg, script: str, fields=None) -> None:
    """A checkpoint must come from this script and, for the architecture fields, the same model."""
    if ckpt.get("script") != script:
        raise UserError(f"checkpoint was written by {ckpt.get('script', 'another program')}, not {script}")
    for name in fields if fields is not None else ARCH_FIELDS:
        theirs, ours = ckpt["config"].get(name), getattr(cfg, name)
        if theirs != ours:
            raise UserError(f"checkpoint has {name}={theirs} but this run has {name}={ours}; "
                            "use the checkpoint's architecture")


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
        check_compatible(ckpt, cfg, "gpt.py")
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
                "script": "gpt.py", "stage": stage, "model": raw.state_dict(), "optimizer": opt.state_dict(),
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


def pretrain(cfg: Config) -> dict:
    """Stage `pretrain`: learn the tokenizer (or reuse init_from's), then the language model."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    name, train_text, val_text = load_lm_text(cfg.data)
    model, tok = None, None
    if cfg.resume:
        ckpt = load_checkpoint(str(Path(cfg.out_dir) / "ckpt.pt"))
        tok = tokenizer_from_state(ckpt["tokenizer"])
        cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size or ckpt["config"]["vocab_size"])
    elif cfg.init_from:
        model, tok, cfg = load_pretrained(cfg)
        if tok is None:
            raise UserError(f"{cfg.init_from} has no tokenizer gpt.py can read (GPT-2's vocab.json + "
                            "merges.txt); continue pretraining from a gpt2 folder or a gpt.py checkpoint")
    else:
        tok = build_tokenizer(cfg, name, train_text)
    if not cfg.vocab_size:
        cfg = dataclasses.replace(cfg, vocab_size=len(tok))
    if cfg.vocab_size < len(tok):
        raise UserError(f"--vocab_size {cfg.vocab_size} is smaller than the tokenizer's {len(tok)} tokens")
    model = model or build_model(cfg)
    train_ids = torch.tensor(tok.encode(train_text), dtype=torch.long)
    val_ids = torch.tensor(tok.encode(val_text), dtype=torch.long)
    if len(val_ids) <= cfg.block_size + 1:
        raise UserError(f"validation text has {len(val_ids)} tokens, fewer than one block of "
                        f"{cfg.block_size + 1}; use more data or a smaller --block_size")
    if isinstance(tok, CharTokenizer) and tok.unseen:
        log0(f"validation text has {sum(tok.unseen.values())} characters never seen in training "
             f"({''.join(sorted(tok.unseen))!r}); they map to the unknown id 0")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    sampler = BlockSampler(train_ids, cfg.batch_size, cfg.block_size, cfg.seed, rank, world)
    n_params = sum(p.numel() for p in model.parameters())
    log0(f"pretraining on {name}: {len(train_ids):,} train / {len(val_ids):,} val tokens, vocab {len(tok)}, "
         f"{n_params / 1e6:.2f}M parameters, arch {cfg.arch}")

    def evaluate(m, device):
        total, count = 0.0, 0
        for b in eval_batches(val_ids, cfg.batch_size, cfg.block_size, cfg.eval_batches):
            b = {k: v.to(device) for k, v in b.items()}
            total += pretrain_loss(m, b).item() * b["targets"].numel()
            count += b["targets"].numel()
        return {"loss": total / count, "ppl": math.exp(total / count)}

    return run_training(cfg, "pretrain", model, sampler, pretrain_loss, evaluate, cfg.total_steps, cfg.lr,
                        cfg.warmup_steps, "cosine", {"tokenizer": tok.state()},
                        cfg.batch_size * cfg.block_size * cfg.grad_accum * world, model.flops_per_token())


def finetune(cfg: Config) -> dict:
    """Stage `finetune`: classification from a BPE-pretrained checkpoint (section 3.2)."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    if not cfg.init_from and not cfg.resume:
        raise UserError("finetune needs --init_from a BPE-pretrained checkpoint "
                        "(e.g. python gpt.py pretrain --data wikitext2)")
    if cfg.resume:
        ckpt = load_checkpoint(str(Path(cfg.out_dir) / "ckpt.pt"))
        tok = tokenizer_from_state(ckpt["tokenizer"])
        cfg = dataclasses.replace(cfg, **{k: ckpt["config"][k] for k in ARCH_FIELDS})
        gpt = build_model(cfg)
        label_list = ckpt["labels"]
    else:
        gpt, tok, cfg = load_pretrained(cfg)
        label_list = None
    if not isinstance(tok, ByteBPE) or "<|extract|>" not in tok.specials:
        kind = "character-level" if isinstance(tok, CharTokenizer) else "without GPT's special tokens"
        raise UserError(f"fine-tuning needs a byte-level BPE checkpoint from gpt.py pretrain (it holds the "
                        f"start/extract tokens); this one is {kind}: pretrain with --tokenizer bpe")
    name, train_rows, dev_rows = load_classification(cfg.finetune_data, cfg.seed)
    label_list = label_list or sorted({label for label, _ in train_rows})
    labels = {label: i for i, label in enumerate(label_list)}
    train = encode_classification(train_rows, tok, labels, cfg.block_size, "train")
    dev = encode_classification(dev_rows, tok, labels, cfg.block_size, "dev")
    model = GPTClassifier(gpt, len(labels), cfg.clf_dropout)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    sampler = EpochSampler(train, cfg.finetune_batch_size, cfg.seed, rank, world)
    total = sampler.per_epoch * cfg.finetune_epochs
    log0(f"fine-tuning on {name}: {len(train)} train / {len(dev)} dev examples, labels {label_list}, "
         f"{total} steps")

    def evaluate(m, device):
        correct, loss_sum = 0, 0.0
        for i in range(0, len(dev), cfg.finetune_batch_size):
            b = {k: v.to(device) for k, v in collate(dev[i:i + cfg.finetune_batch_size]).items()}
            logits, _ = m(b["input_ids"], b["lengths"])
            correct += (logits.argmax(-1) == b["labels"]).sum().item()
            known = b["labels"] >= 0
            if known.any():
                loss_sum += F.cross_entropy(logits.float()[known], b["labels"][known], reduction="sum").item()
        return {"loss": loss_sum / len(dev), "acc": correct / len(dev)}

    mean_len = sum(len(x) for x, _ in train) / len(train)
    return run_training(dataclasses.replace(cfg, lr=cfg.finetune_lr, min_lr=0.0), "finetune", model, sampler,
                        lambda m, b: finetune_loss(m, b, cfg.lm_coef)[0], evaluate, total, cfg.finetune_lr,
                        math.ceil(cfg.finetune_warmup * total), "linear",
                        {"tokenizer": tok.state(), "labels": label_list},
                        round(cfg.finetune_batch_size * mean_len * cfg.grad_accum * world),
                        gpt.flops_per_token())


# -----------------------------------------------------------------------------------------------------
# Pretrained weights: our checkpoints, and Hugging Face GPT-1 (openai-gpt) and GPT-2 directories


def load_pretrained(cfg: Config):
    """(GPT, tokenizer, cfg with the checkpoint's architecture) from --init_from."""
    if cfg.init_from.startswith("hf:"):
        return load_hf(cfg.init_from[3:], cfg)
    ckpt = load_checkpoint(cfg.init_from)
    if ckpt.get("script") != "gpt.py":
        raise UserError(f"{cfg.init_from} was written by {ckpt.get('script', 'another program')}, not gpt.py")
    cfg = dataclasses.replace(cfg, **{k: ckpt["config"][k] for k in ARCH_FIELDS})
    model = build_model(cfg)
    state = ckpt["model"]
    if ckpt["stage"] == "finetune":  # a classifier: take its language model
        state = {k[4:]: v for k, v in state.items() if k.startswith("gpt.")}
    model.load_state_dict(state)
    return model, tokenizer_from_state(ckpt["tokenizer"]), cfg


def load_hf(path: str, cfg: Config):
    """Map a Hugging Face OpenAIGPTLMHeadModel or GPT2LMHeadModel directory onto GPT. Their Conv1D layers
    store weights as (in, out): transposed here. The tokenizer is read from GPT-2's vocab.json and
    merges.txt when present (byte-level BPE); openai-gpt's character BPE is not supported, so sampling
    text from it needs token ids."""
    root = Path(path)
    if not (root / "config.json").is_file():
        raise UserError(f"{root} has no config.json: --init_from hf:DIR needs a Hugging Face model folder")
    hf = json.loads((root / "config.json").read_text())
    kind = hf.get("model_type")
    if kind not in ("openai-gpt", "gpt2"):
        raise UserError(f"{root} holds a {kind} model; only openai-gpt and gpt2 load into gpt.py")
    if hf.get("afn", hf.get("activation_function", "gelu_new")) not in ("gelu", "gelu_new"):
        raise UserError(f"{root} uses activation {hf.get('afn') or hf.get('activation_function')}, not GELU")
    if (root / "model.safetensors").is_file():
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UserError("reading model.safetensors needs the safetensors package: pip install safetensors") from None
        sd = load_file(str(root / "model.safetensors"))
    elif (root / "pytorch_model.bin").is_file():
        sd = torch.load(root / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise UserError(f"{root} has neither model.safetensors nor pytorch_model.bin")
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    cfg = dataclasses.replace(cfg, arch="gpt1" if kind == "openai-gpt" else "gpt2", n_layer=hf["n_layer"],
                              n_head=hf["n_head"], d_model=hf["n_embd"], block_size=hf["n_positions"],
                              vocab_size=hf["vocab_size"], bias=True)
    model = build_model(cfg)
    names = {"wte.weight": "tokens_embed.weight" if kind == "openai-gpt" else "wte.weight",
             "wpe.weight": "positions_embed.weight" if kind == "openai-gpt" else "wpe.weight",
             "ln_f.weight": "ln_f.weight", "ln_f.bias": "ln_f.bias"}
    for i in range(cfg.n_layer):
        for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"),
                             ("mlp.proj", "mlp.c_proj"), ("ln_1", "ln_1"), ("ln_2", "ln_2")):
            for p in ("weight", "bias"):
                names[f"blocks.{i}.{ours}.{p}"] = f"h.{i}.{theirs}.{p}"
    state = {}
    for ours, ref in model.state_dict().items():
        theirs = names[ours]
        if theirs not in sd:
            raise UserError(f"{root} has no weight {theirs}; is it a complete {kind} checkpoint?")
        w = sd[theirs]
        state[ours] = w.t() if w.dim() == 2 and "blocks." in ours and "ln_" not in ours else w
        if state[ours].shape != ref.shape:
            raise UserError(f"{root}: {theirs} has shape {tuple(w.shape)}, expected {tuple(ref.shape)}")
    model.load_state_dict(state)
    return model, load_hf_tokenizer(root), cfg


def load_hf_tokenizer(root: Path):
    """GPT-2's vocab.json + merges.txt as a ByteBPE with GPT-2's ids (None when the folder has none)."""
    if not ((root / "vocab.json").is_file() and (root / "merges.txt").is_file()):
        return None
    # GPT-2 writes each byte as a printable character: printable latin-1 as itself, the rest from 256 up.
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    char_of = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(sorted(set(range(256)) - set(keep)))}
    byte_of = {c: b for b, c in char_of.items()}
    vocab = json.loads((root / "vocab.json").read_text(encoding="utf-8"))
    pieces = [bytes(byte_of[c] for c in t) for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    id_of = {p: i for i, p in enumerate(pieces)}
    merges = []
    for line in (root / "merges.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#version"):
            a, b = line.split(" ")
            merges.append((id_of[bytes(byte_of[c] for c in a)], id_of[bytes(byte_of[c] for c in b)]))
    return ByteBPE(merges, (), pieces)


# -----------------------------------------------------------------------------------------------------
# Stage `sample`


def sample(cfg: Config) -> dict:
    if not cfg.init_from:
        raise UserError("sample needs --init_from a checkpoint (out_dir/ckpt.pt) or hf:DIR")
    model, tok, cfg = load_pretrained(cfg)
    if tok is None:
        raise UserError(f"{cfg.init_from} has no tokenizer (vocab.json + merges.txt) to encode the prompt")
    device, _, ctx = setup_device(cfg)
    model.to(device)
    ids = tok.encode(cfg.prompt)
    if isinstance(tok, CharTokenizer) and tok.unseen:
        log0(f"warning: the prompt has characters the model never saw ({''.join(sorted(tok.unseen))!r}); "
             "they map to the unknown id 0")
    if not ids:
        raise UserError("--prompt encodes to no tokens; give some text")
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    idx = torch.tensor([ids] * cfg.num_samples, device=device)[:, -cfg.block_size:]
    with ctx:
        out = generate(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, generator=gen)
    texts = [tok.decode(row) for row in out.tolist()]
    for t in texts:
        print(t, "\n" + "-" * 60, flush=True)
    return {"samples": texts}


# -----------------------------------------------------------------------------------------------------
# CLI


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
        if stage == "sample":
            return sample(cfg)
        # the main job: pretrain into out_dir/pretrain, then sample from it
        root = Path(cfg.out_dir)
        metrics = pretrain(dataclasses.replace(cfg, out_dir=str(root / "pretrain")))
        if int(os.environ.get("RANK", "0")) == 0:
            log0(f"samples from {root / 'pretrain' / 'ckpt.pt'}:")
            sample(dataclasses.replace(cfg, init_from=str(root / "pretrain" / "ckpt.pt"), resume=False))
        return metrics
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
