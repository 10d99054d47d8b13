"""GPT: generative pre-training of a Transformer decoder, then discriminative fine-tuning.

Paper: Alec Radford, Karthik Narasimhan, Tim Salimans, Ilya Sutskever, "Improving Language Understanding by
Generative Pre-Training", OpenAI 2018 (no arXiv id; the official code is openai/finetune-transformer-lm).

What this file reproduces
  - Section 3.1: a 12-layer decoder-only Transformer, masked self-attention, learned positions, GELU (tanh
    form), post-LN blocks `n = LN(x + attn(x)); h = LN(n + mlp(n))`, no final LayerNorm, the LM head tied to
    the token embedding, N(0, 0.02) init, dropout 0.1 (`--arch gpt1`); `--arch gpt2` is GPT-2's pre-LN
    variant (a final LayerNorm, residual projections scaled by 1/sqrt(2 n_layer)) that nanoGPT made familiar.
  - Section 4.1 pretraining: next-token cross-entropy, Adam at max lr 2.5e-4, linear warmup over 2000
    updates then cosine annealing to 0, decoupled weight decay 0.01 on matrices.
  - Sections 3.2-3.3 fine-tuning: `[start] text [extract]`, a linear head on the extract token's final state,
    loss L_clf + 0.5 L_LM, lr 6.25e-5, batch 32, 3 epochs, warmup over 0.2% of the steps, then linear decay.

Run it (`--help` lists every field, grouped by stage)
  python gpt.py     # main job: SST-2 from the LM pretrained on its sentences vs from random init (Table 5)
  python gpt.py pretrain --data wikitext2 --out_dir out/wt2         # a byte-level BPE language model
  python gpt.py finetune --init_from out/wt2/ckpt.pt --finetune_data sst2 --out_dir out/sst2
  python gpt.py sample --init_from out/gpt/pretrain/best.pt --prompt "the film"  # or hf:DIR (GPT-1/GPT-2)
  torchrun --nproc_per_node=2 gpt.py pretrain ...  # data parallel

Deliberate deviations from the paper
  - Tokenizer: byte-level BPE (GPT-2's) for GPT-1's ftfy + spaCy + character BPE: no library, any string
    round-trips. Thousands of merges, not 40,000; none for tiny shakespeare: characters (bytes), as nanoGPT.
  - Embedding dropout falls on the summed token+position embeddings (as Hugging Face's port); the official
    code drops elements of the embedding matrix itself (`dropout(we)`), so its tied output layer does too.
  - Data: BooksCorpus is not redistributable: tiny shakespeare, WikiText-2, SST-2's training sentences (labels
    unread: the main job's text close to the task) and, offline, the Python documentation. The paper trained 100
    epochs; the `paper` preset's 100k steps of 64 x 512 tokens are 3.3B tokens, about 4 epochs of BooksCorpus.
  - The main job fine-tunes on 1,000 of SST-2's 67k labelled phrases (dev whole), one lr for both arms; its small
    preset is pre-LN (`--arch gpt2`): post-LN stalled at the unigram loss at lr 1e-3 to 2e-3 on this BPE text.
"""

from __future__ import annotations

import argparse, atexit, contextlib, dataclasses, functools, hashlib, heapq, importlib.util, inspect, json, math, os
import random, re, signal, sys, threading, time, typing, unicodedata, urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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
    # model (section 3.1; the official code: n_layer 12, n_head 12, n_embd 768, n_ctx 512)
    arch: Literal["gpt1", "gpt2"] = "gpt1"  # gpt1: post-LN, no final LN (the paper); gpt2: pre-LN, final LN
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    block_size: int = 512  # the context length, n_ctx
    vocab_size: int = 0  # embedding rows; 0: the tokenizer's size (more pads it, e.g. to a multiple of 64)
    dropout: float = 0.1  # embedding, attention and residual dropout (section 4.1)
    # pretrain (section 4.1: Adam, max lr 2.5e-4, 2000 warmup updates, cosine to 0, batch 64 x 512)
    data: str = "shakespeare"  # shakespeare, wikitext2, builtin, or a text file or folder
    tokenizer: Literal["auto", "char", "bpe"] = "auto"  # auto: characters for shakespeare, else BPE
    bpe_vocab_size: int = 4096  # 256 bytes + merges + 3 special tokens (GPT-1: 40,478)
    batch_size: int = 64
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2.5e-4
    min_lr: float = 0.0  # the cosine's floor
    warmup_steps: int = 2000
    total_steps: int = 100_000  # the schedule's length: 3.3B tokens, some 4 epochs of BooksCorpus
    weight_decay: float = 0.01  # decoupled ("modified L2"), on matrices only
    beta1: float = 0.9
    beta2: float = 0.999
    grad_clip: float = 1.0  # the official code's max_grad_norm
    # finetune (sections 3.3 and 4.1)
    finetune_data: str = "sst2"  # sst2, builtin, or a folder with train.tsv and dev.tsv
    finetune_lr: float = 6.25e-5
    finetune_batch_size: int = 32
    finetune_epochs: int = 3
    finetune_warmup: float = 0.002  # the fraction of the fine-tuning steps
    finetune_examples: int = 0  # a subset of the training examples drawn with --seed, both arms the same (0: all)
    finetune_random_init: bool = False  # the baseline: init_from's tokenizer and architecture, untrained weights
    lm_coef: float = 0.5  # lambda in L3 = L2 + lambda * L1
    clf_dropout: float = 0.1
    # sample
    prompt: str = "\n"
    num_samples: int = 3
    max_new_tokens: int = 300
    temperature: float = 0.8  # 0: greedy
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    # run control
    out_dir: str = "out/gpt"
    init_from: str = ""  # a gpt.py checkpoint, or hf:DIR with Hugging Face GPT-1 or GPT-2 weights
    resume: bool = False  # continue the run in out_dir exactly
    max_steps: int = 0  # stop this run at this step (0: run the whole schedule)
    eval_interval: int = 500
    eval_batches: int = 20  # validation batches per evaluation, spread over the split (0: all)
    log_interval: int = 50
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # autocast; master weights stay fp32
    compile: bool = False  # torch.compile the model
    seed: int = 1337

PRESETS = {
    "paper": Config(),
    "small": Config(arch="gpt2", n_layer=4, n_head=4, d_model=128, block_size=64, dropout=0.0, data="sst2",
                    batch_size=32, lr=2e-3, min_lr=2e-4, warmup_steps=100, total_steps=2400,
                    bpe_vocab_size=2048, eval_interval=400, log_interval=100, finetune_lr=5e-4, finetune_epochs=6,
                    finetune_examples=1000, weight_decay=0.1, beta2=0.99, num_samples=2, max_new_tokens=40),
    "tiny": Config(n_layer=2, n_head=2, d_model=32, block_size=32, dropout=0.1, batch_size=8, lr=3e-3, warmup_steps=5,
                   total_steps=40, bpe_vocab_size=300, eval_interval=20, eval_batches=4, log_interval=10, num_samples=1,
                   max_new_tokens=20, finetune_lr=1e-3, finetune_batch_size=8, finetune_epochs=1),
}
ARCH_FIELDS = ("arch", "n_layer", "n_head", "d_model", "block_size", "vocab_size")

def validate(cfg: Config) -> None:
    for name in ("n_layer", "n_head", "d_model", "block_size", "batch_size", "grad_accum", "total_steps", "lr",
                 "finetune_lr", "finetune_batch_size", "finetune_epochs", "eval_interval", "log_interval"):
        require(getattr(cfg, name) > 0, f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("vocab_size", "warmup_steps", "max_steps", "eval_batches", "top_k", "weight_decay", "temperature"):
        require(getattr(cfg, name) >= 0, f"--{name} must not be negative, got {getattr(cfg, name)}")
    require(cfg.d_model % cfg.n_head == 0, f"--n_head {cfg.n_head} must divide --d_model {cfg.d_model}")
    require(0 <= cfg.dropout < 1 and 0 <= cfg.clf_dropout < 1 and 0 < cfg.top_p <= 1 and 0 <= cfg.min_lr <= cfg.lr,
            "--dropout and --clf_dropout must be in [0, 1), --top_p in (0, 1], --min_lr in [0, --lr]")
    require(cfg.bpe_vocab_size >= 259, "--bpe_vocab_size must be at least 259 (256 bytes and 3 special tokens)")

# -----------------------------------------------------------------------------------------------------
# Model (section 3.1)

class CausalSelfAttention(nn.Module):
    """Masked multi-head self-attention with one fused QKV projection and an optional KV cache."""
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head, self.dropout, self.resid_drop = cfg.n_head, cfg.dropout, nn.Dropout(cfg.dropout)
        self.qkv, self.proj = nn.Linear(cfg.d_model, 3 * cfg.d_model), nn.Linear(cfg.d_model, cfg.d_model)
    def forward(self, x, cache=None):
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_head)
        if cache is not None:  # cache: [k, v] of the earlier positions, extended in place
            cache[:] = k, v = (k, v) if cache[0] is None else (torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2))
        T, S = q.size(2), k.size(2)  # the new queries see all S keys up to their own position
        causal = None if T == S else torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, is_causal=T == S,  # softmax(QK^T/sqrt(d))V
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(rearrange(y, "b h t d -> b t (h d)")))

class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.fc, self.proj = nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
    def forward(self, x):
        return self.drop(self.proj(F.gelu(self.fc(x), approximate="tanh")))  # the official code's GELU

class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.pre_ln = cfg.arch == "gpt2"
        self.ln_1, self.attn = nn.LayerNorm(cfg.d_model, eps=1e-5), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.d_model, eps=1e-5), MLP(cfg)
    def forward(self, x, cache=None):
        if self.pre_ln:  # GPT-2: x + f(LN(x))
            x = x + self.attn(self.ln_1(x), cache)
            return x + self.mlp(self.ln_2(x))
        n = self.ln_1(x + self.attn(x, cache))  # GPT-1: n = LN(x + a); h = LN(n + m)
        return self.ln_2(n + self.mlp(n))

class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        require(cfg.vocab_size > 0, "--vocab_size must be positive (the tokenizer sets it when data is loaded)")
        self.cfg, self.drop = cfg, nn.Dropout(cfg.dropout)
        self.wte, self.wpe = nn.Embedding(cfg.vocab_size, cfg.d_model), nn.Embedding(cfg.block_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=1e-5) if cfg.arch == "gpt2" else None
        for name, p in self.named_parameters():  # N(0, 0.02) (section 4.1), biases 0, LayerNorm gains 1
            if p.dim() == 2:  # GPT-2 scales its residual projections down by sqrt(2 n_layer)
                nn.init.normal_(p, std=0.02 / (math.sqrt(2 * cfg.n_layer) if self.ln_f and "proj" in name else 1))
            elif name.endswith("bias"):
                nn.init.zeros_(p)
    def hidden(self, idx, cache=None):
        """Final hidden states h_n (B, T, C); with a cache, idx continues the cached positions."""
        start = 0 if cache is None or cache[0][0] is None else cache[0][0].size(2)
        require(start + idx.size(1) <= self.cfg.block_size, f"a sequence of {start + idx.size(1)} tokens is longer "
                f"than the context of {self.cfg.block_size}; use --block_size or a shorter input")
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(start, start + idx.size(1), device=idx.device)))  # h_0
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache[i])  # h_l = transformer_block(h_{l-1})   (B, T, C)
        return x if self.ln_f is None else self.ln_f(x)
    def forward(self, idx, cache=None):
        """Next-token logits (B, T, V): h_n W_e^T, the output layer tied to the token embedding."""
        return self.hidden(idx, cache) @ self.wte.weight.T
    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6N for the weights plus 12 L T C for attention (PaLM appendix B)."""
        n = sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()
        return 6 * n + 12 * self.cfg.n_layer * self.cfg.block_size * self.cfg.d_model

build_model = GPT

# -----------------------------------------------------------------------------------------------------
# Objective: next-token cross-entropy, L1 (eq. 1), in fp32 even under autocast

def pretrain_loss(model, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["input_ids"]).float().flatten(0, 1), batch["targets"].flatten())

# -----------------------------------------------------------------------------------------------------
# Downstream: classification fine-tuning (sections 3.2-3.3), and sampling

class GPTClassifier(nn.Module):
    """[start] text [extract] -> the final hidden state at the extract token -> dropout -> linear (W_y)."""
    def __init__(self, gpt: GPT, n_classes: int, clf_dropout: float):
        super().__init__()
        self.gpt, self.drop, self.head = gpt, nn.Dropout(clf_dropout), nn.Linear(gpt.cfg.d_model, n_classes)
        nn.init.normal_(self.head.weight, std=0.02), nn.init.zeros_(self.head.bias)
    def forward(self, ids, lengths):
        """ids (B, T) right-padded (causal attention keeps padding out), the last real one [extract] -> logits."""
        h = self.gpt.hidden(ids)  # (B, T, C)
        h_extract = h[torch.arange(ids.size(0), device=ids.device), lengths - 1]  # (B, C)
        return self.head(self.drop(h_extract)), h @ self.gpt.wte.weight.T

def finetune_loss(model: GPTClassifier, batch: dict, lm_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """L3 = L2 + lambda * L1 (eq. 5), L1 averaged over each sequence's text, then over the batch (as officially)."""
    clf_logits, lm_logits = model(batch["input_ids"], batch["lengths"])
    clf = F.cross_entropy(clf_logits.float(), batch["labels"])
    real = torch.arange(batch["input_ids"].size(1) - 1, device=clf.device) < (batch["lengths"][:, None] - 1)
    lm = F.cross_entropy(lm_logits[:, :-1].float().transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
    return clf + lm_coef * ((lm * real).sum(1) / real.sum(1)).mean(), clf_logits

@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature=1.0, top_k=0, top_p=1.0,
             use_cache=True) -> torch.Tensor:
    """Extend idx (B, T) by max_new_tokens (temperature 0: greedy), one token a step through the KV cache; a full
    context slides, and learned absolute positions then need a fresh pass over the last block_size tokens."""
    was_training, block, cache = model.training, model.cfg.block_size, None
    model.eval()
    for _ in range(max_new_tokens):
        restart = cache is None or cache[0][0].size(2) == block  # (re)start: a fresh pass over the window
        cache = ([[None, None] for _ in model.blocks] if use_cache else None) if restart else cache
        logits = model(idx[:, -block:] if restart else idx[:, -1:], cache)[:, -1].float()
        nxt = logits.argmax(-1, keepdim=True) if temperature == 0 else \
            torch.multinomial(filter_logits(logits / temperature, top_k, top_p).softmax(-1), 1)
        idx = torch.cat([idx, nxt], dim=1)
    model.train(was_training)
    return idx

def filter_logits(logits, top_k=0, top_p=1.0):
    """Keep the top_k largest logits and the smallest set whose probability reaches top_p."""
    if top_k:
        logits = logits.masked_fill(logits < logits.topk(min(top_k, logits.size(-1))).values[:, -1:], -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        drop = (p := sorted_logits.softmax(-1)).cumsum(-1) - p >= top_p  # the tokens after the mass reached top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return logits

# -----------------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE (GPT-2's form of GPT's BPE); with no merges it reads characters (bytes)
SPECIAL_TOKENS = ("<|start|>", "<|delimiter|>", "<|extract|>")  # section 3.3's input transformations
# GPT-2's pre-tokenizer in `re`: contractions, letters (\p{L}), numbers (\p{N}: also numerals outside \d, as "x²"),
# other symbols (with \x1c-\x1f, which `re` counts as \s), whitespace; a space joins the word after it.
NUMERALS = "".join(c for c in map(chr, range(sys.maxunicode + 1)) if unicodedata.category(c) in ("Nl", "No"))
PRETOKENIZE = re.compile(rf"'(?:[sdmt]|ll|ve|re)| ?[^\W\d_{NUMERALS}]+| ?[\d{NUMERALS}]+| ?(?:[^\s\w]|[_\x1c-\x1f])+"
                         r"|[^\S\x1c-\x1f]+(?![\S\x1c-\x1f])|[^\S\x1c-\x1f]+")  # merges never cross these pieces

class ByteBPE:
    """A string is its UTF-8 bytes, merged pairwise in the order the merges were learned; `pieces[i]` are token i's
    bytes (256 bytes, then one token per merge), then come the special tokens. Training counts pairs over word
    types and updates the counts after each merge (a heap finds the top pair): WikiText-2 in seconds."""

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
        seqs, freqs = [list(w.encode("utf-8")) for w in words], list(words.values())
        pair_count, where = Counter(), {}  # pair -> frequency, pair -> the words holding it
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
            merges.append(pair)
            changed = set()
            for i in where.pop(pair):  # take each word's pairs out, merge, put the new ones in
                for p in zip(seqs[i], seqs[i][1:]):
                    pair_count[p] -= freqs[i]
                    changed.add(p)
                seqs[i] = cls._merge(seqs[i], pair, 255 + len(merges))
                for p in zip(seqs[i], seqs[i][1:]):
                    pair_count[p] += freqs[i]
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
            hit = j + 1 < len(ids) and (ids[j], ids[j + 1]) == pair
            out.append(new if hit else ids[j])
            j += 2 if hit else 1
        return out

    def _encode_word(self, word: str) -> list[int]:
        if word not in self.cache:
            ids = [self.byte_ids[b] for b in word.encode("utf-8")]
            while len(ids) > 1:  # apply the earliest-learned merge present, everywhere, as training did
                pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, (math.inf,))[0])
                if pair not in self.ranks:
                    break
                ids = self._merge(ids, pair, self.ranks[pair][1])
            self.cache[word] = ids
        return self.cache[word]

    def encode(self, text: str) -> list[int]:
        return [i for w in PRETOKENIZE.findall(text) for i in self._encode_word(w)]

    def decode(self, ids) -> str:
        names = {i: s.encode("utf-8") for s, i in self.specials.items()}
        return b"".join(names.get(i) or self.pieces[i] for i in ids).decode(errors="replace")

    def state(self) -> dict:
        return {"merges": self.merges, "specials": list(self.specials), "pieces": self.pieces}

# -----------------------------------------------------------------------------------------------------
# Data: language-model text and random blocks of it; labelled sentences for fine-tuning

DATASETS = {  # name -> {file in the cache: (pinned URL, sha256)}; ../shared/data/URLS.md lists them all
    "shakespeare": {"input.txt": ("https://raw.githubusercontent.com/karpathy/char-rnn/6f9487a6fe5b420b7ca9afb0d7c0"
                                  "78e37c1d1b4e/data/tinyshakespeare/input.txt",
                                  "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed")},
    "wikitext2": {f"{s}.txt": ("https://raw.githubusercontent.com/pytorch/examples/77f55b912142e11fcfdf5b530231fb9c"
                               f"52f181e8/word_language_model/data/wikitext-2/{s}.txt", h) for s, h in (
        ("train", "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f"),
        ("valid", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"))},
    "sst2": {f"{s}.tsv": ("https://raw.githubusercontent.com/eyalbd2/Reproducing-AutoPrompt/6288fb5bec9c572f2492875ae0"
                          f"111df5b6daed11/glue_data/SST-2/{f}.tsv", h) for s, f, h in (  # train_full: all of it
        ("train", "train_full", "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1"),
        ("dev", "dev", "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0"))},
}

def load_lm_text(data: str) -> tuple[str, str, str]:
    """(name, train text, validation text): a named dataset's or a folder's *train*.txt and *valid*.txt, else 10% of
    a file's (all a folder's but *test* files') characters held out; builtin, offline: Python's docs, 8 topics out."""
    if data in DATASETS:
        data = str(download(data, "the built-in corpus (Python documentation)") or "builtin")
    if data == "builtin":
        docs = [text for _, text in sorted(importlib.import_module("pydoc_data.topics").topics.items())]
        return "builtin", "\n".join(docs[:-8]), "\n".join(docs[-8:])
    path = Path(data)
    require(path.exists() or os.sep in data or "." in data, f"unknown dataset {data!r}: use one of "
            f"{', '.join(DATASETS)}, builtin, or a path to a text file or folder")
    train, valid = (sorted(path.glob(f"*{split}*.txt")) if path.is_dir() else [] for split in ("train", "valid"))
    if train and valid:  # train.txt and valid.txt, ptb.train.txt and ptb.valid.txt, ...
        return path.name, read_text(train[0]), read_text(valid[0])
    files = sorted(p for p in path.rglob("*") if p.is_file() and not re.match(r"\.|.*test", p.name)) or [path]
    text = "\n".join(read_text(p) for p in files)
    return path.name, text[:int(0.9 * len(text))], text[int(0.9 * len(text)):]

def load_unlabelled_text(data: str) -> tuple[str, str, str]:
    """sst2 or a folder's train.tsv: its sentences a line each, no label, no dev.tsv; 10% held out. Else load_lm_text"""
    data = str(download(data, "the built-in corpus (Python documentation)") or "builtin") if data == "sst2" else data
    if not (Path(data) / "train.tsv").is_file():
        return load_lm_text(data)
    lines = [text.strip() for _, text in read_tsv(Path(data) / "train.tsv")]
    return Path(data).name, "\n".join(lines[:len(lines) * 9 // 10]), "\n".join(lines[len(lines) * 9 // 10:])

class BlockSampler:
    """Random contiguous blocks (nanoGPT's; GPT's 512-token windows), each rank from its shard: input_ids (B, T)
    and the targets shifted by one. `position` counts the batches drawn and seeds the next one."""
    def __init__(self, tokens: torch.Tensor, batch_size: int, block_size: int, seed: int):
        self.tokens, self.batch_size, self.block_size = tokens.chunk(WORLD)[RANK], batch_size, block_size
        require(len(self.tokens) > block_size + 1, f"the training text has {len(self.tokens)} tokens per rank, "
                f"fewer than one block of {block_size + 1}; use more data or a smaller --block_size")
        self.seed, self.position = seed, 0

    def __next__(self) -> dict:
        gen, self.position = torch.Generator().manual_seed(hash((self.seed, RANK, self.position))), self.position + 1
        starts = torch.randint(len(self.tokens) - self.block_size - 1, (self.batch_size,), generator=gen)
        block = torch.stack([self.tokens[s:s + self.block_size + 1] for s in starts.tolist()])
        return {"input_ids": block[:, :-1], "targets": block[:, 1:]}

def read_tsv(path: Path) -> list[tuple[str, str]]:
    """(label, text) rows of GLUE's `sentence<TAB>label` after a header, or of `label<TAB>text` (tabs in text)."""
    lines, rows = read_text(path).split("\n"), []
    glue = lines[0].startswith("sentence\t")
    for n, line in enumerate(lines[glue:], 1 + glue):
        text, _, label = line.rpartition("\t") if glue else line.partition("\t")[::-1]
        require(text.strip() and label.strip() or not line.strip(), f"{path}:{n}: expected "
                f"{'sentence<TAB>label' if glue else 'label<TAB>text'}")
        rows += [(label.strip(), text)] if line.strip() else []
    return rows

def synthetic_sentiment(n: int, seed: int) -> list[tuple[str, str]]:
    """Generated reviews whose label (1 positive, 0 negative) is their one sentiment word's polarity; seeded."""
    rng, rows = random.Random(seed), []
    words = [["bad", "dull", "awful", "boring", "clumsy", "tedious", "weak", "messy"],
             ["good", "great", "wonderful", "moving", "funny", "brilliant", "charming", "sharp"]]
    things = ["film", "plot", "cast", "script", "ending", "score", "story", "director"]
    for y in (rng.randrange(2) for _ in range(n)):
        rows.append((str(y), f"the {rng.choice(things)} was {rng.choice(words[y])} and the {rng.choice(things)} "
                             f"{rng.choice(['was', 'felt', 'seemed'])} {rng.choice(['long', 'short', 'new', 'old'])}"))
    return rows

def load_classification(data: str, seed: int):
    """(name, train rows, dev rows): SST-2's or a folder's train.tsv and dev.tsv (GLUE's SST-2 test has no labels);
    builtin and offline: a generated synthetic task."""
    if data in DATASETS:
        data = str(download(data, "the built-in synthetic sentiment task") or "builtin")
    if data == "builtin":
        log0("the built-in SYNTHETIC sentiment task (generated, not real reviews)")
        return "builtin-synthetic", synthetic_sentiment(2000, seed), synthetic_sentiment(400, seed + 1)
    require(Path(data).is_dir(), f"classification data {data!r} is neither sst2, builtin nor a folder")
    train, dev = read_tsv(Path(data) / "train.tsv"), read_tsv(Path(data) / "dev.tsv")
    require(train and dev, f"{data}: train.tsv and dev.tsv must hold examples")
    return Path(data).name, train, dev

def encode_classification(rows, tok: ByteBPE, labels: dict, block_size: int, split: str) -> list[dict]:
    """[start] text [extract], the text cut to fit the context; a label unseen in training is -1 (always wrong)."""
    unknown = [label for label, _ in rows if label not in labels]
    require(split != "train" or not unknown, f"training label {unknown[:1]} is not one of {sorted(labels)}")
    unknown and log0(f"warning: {len(unknown)} {split} examples have labels unseen in training; counted as errors")
    start, extract = tok.specials["<|start|>"], tok.specials["<|extract|>"]
    return [{"ids": [start] + tok.encode(text)[:block_size - 2] + [extract], "label": labels.get(label, -1)}
            for label, text in rows]

def collate(examples: list[dict]) -> dict:
    """Right-padded ids (B, T), lengths (B,) and labels (B,)."""
    ids = torch.zeros(len(examples), max(len(e["ids"]) for e in examples), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e["ids"])] = torch.tensor(e["ids"])
    return {"input_ids": ids, "lengths": torch.tensor([len(e["ids"]) for e in examples]),
            "labels": torch.tensor([e["label"] for e in examples])}

class EpochSampler:
    """Shuffled minibatches of collate(examples), a new permutation each epoch, each rank its own slice of every
    batch and as many batches as the others. `position` counts the batches drawn."""

    def __init__(self, examples: list, batch_size: int, seed: int):
        self.examples, self.batch_size, self.seed, self.position = examples, batch_size, seed, 0
        self.per_epoch = max(1, len(examples) // (batch_size * WORLD))

    def __next__(self) -> dict:
        (epoch, index), self.position = divmod(self.position, self.per_epoch), self.position + 1
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed + epoch))
        start = (index * WORLD + RANK) * self.batch_size
        return collate([self.examples[i] for i in order[start:start + self.batch_size].tolist()])

# -----------------------------------------------------------------------------------------------------
# Stages: pretrain (section 4.1), finetune (sections 3.2-3.3), sample

def warmup_then_decay(warmup: int, total: int, floor: float = 0.0, shape: str = "cosine"):
    """The lr multiplier: linear warmup from 0, then cosine (pretraining) or linear (fine-tuning) decay to floor."""
    def f(step):
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if shape == "cosine" else 1 - progress
        return (step + 1) / warmup if step < warmup else floor + (1 - floor) * decay
    return f

def adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple, eps: float) -> torch.optim.AdamW:
    """Adam with decoupled weight decay on matrices only (none on biases and LayerNorms); fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=params[0].device.type == "cuda")

def load_pretrained(cfg: Config, resumed: dict | None = None, weights=True) -> tuple[GPT, ByteBPE | None, Config]:
    """(GPT, tokenizer, cfg with its architecture) of a resumed run (the loop loads its weights) or --init_from;
    weights=False: that architecture and tokenizer with the weights a new model of the seed gets."""
    if cfg.init_from.startswith("hf:") and not resumed:
        model, tok, cfg = load_hf(Path(cfg.init_from[3:]), cfg)
        return model if weights else build_model(cfg), tok, cfg
    ckpt = resumed or load_checkpoint(cfg.init_from)
    cfg = dataclasses.replace(cfg, **{k: ckpt["config"][k] for k in ARCH_FIELDS})
    model, prefix = build_model(cfg), "gpt." if ckpt["stage"] == "finetune" else ""
    if weights and not resumed:
        model.load_state_dict({k.removeprefix(prefix): v for k, v in ckpt["model"].items() if k.startswith(prefix)})
    return model, ByteBPE(**ckpt["tokenizer"]), cfg

def pretrain(cfg: Config) -> dict:
    """the language model on --data (section 4.1), after learning its tokenizer"""
    ckpt = open_run(cfg, "pretrain", ARCH_FIELDS + ("data", "tokenizer", "bpe_vocab_size"))
    device, (name, train_text, val_text) = setup(cfg)[0], load_unlabelled_text(cfg.data)
    model, tok, cfg = load_pretrained(cfg, ckpt) if ckpt or cfg.init_from else (None, None, cfg)
    if model is None:  # characters (bytes, no merges) for shakespeare, as nanoGPT; else byte-level BPE
        chars = cfg.tokenizer == "char" or cfg.tokenizer == "auto" and name == "shakespeare"
        t0, tok = time.time(), ByteBPE.train(train_text, 256 if chars else cfg.bpe_vocab_size, SPECIAL_TOKENS)
        log0(f"tokenizer: {len(tok)} tokens, {len(tok.merges)} BPE merges learned in {time.time() - t0:.1f}s")
        model = build_model(cfg := dataclasses.replace(cfg, vocab_size=cfg.vocab_size or len(tok)))
    require(tok, f"{cfg.init_from} has no tokenizer gpt.py can read (GPT-2's vocab.json and merges.txt)")
    require(cfg.vocab_size >= len(tok), f"--vocab_size {cfg.vocab_size} is below the tokenizer's {len(tok)}")
    train_ids, val_ids = (torch.tensor(tok.encode(t), dtype=torch.long) for t in (train_text, val_text))
    require(len(val_ids) > cfg.block_size + 1, f"the validation text has {len(val_ids)} tokens, fewer than one "
            f"block of {cfg.block_size + 1}; use more data or a smaller --block_size")
    batches, model = BlockSampler(train_ids, cfg.batch_size, cfg.block_size, cfg.seed), model.to(device)
    log0(f"pretraining on {name}: {len(train_ids):,} train / {len(val_ids):,} val tokens, "
         f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, arch {cfg.arch}")
    def evaluate(m):  # non-overlapping blocks of the split; at most eval_batches batches of them, evenly spread
        n = (len(val_ids) - 1) // cfg.block_size
        starts = np.linspace(0, n - 1, min(n, cfg.eval_batches * cfg.batch_size or n)).round().astype(int)
        blocks = torch.stack([val_ids[s * cfg.block_size:(s + 1) * cfg.block_size + 1] for s in starts]).to(device)
        loss = sum(pretrain_loss(m, {"input_ids": b[:, :-1], "targets": b[:, 1:]}).item() * len(b)
                   for b in blocks.split(cfg.batch_size)) / len(blocks)
        return {"loss": loss, "ppl": math.exp(min(loss, 700))}
    opt = adamw(model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), 1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_then_decay(cfg.warmup_steps, cfg.total_steps,
                                                                     cfg.min_lr / cfg.lr))
    return {**train_loop(cfg, "pretrain", model, opt, sched, batches, pretrain_loss, evaluate, ckpt, keep_best=True,
                         total=cfg.total_steps, tokens=cfg.batch_size * cfg.block_size * cfg.grad_accum,
                         flops=model.flops_per_token(), extra={"tokenizer": tok.state()}), "data": name}

def finetune(cfg: Config) -> dict:
    """classification on --finetune_data from a pretrained checkpoint (sections 3.2-3.3)"""
    ckpt = open_run(cfg, "finetune", ("finetune_data", "finetune_examples", "finetune_random_init"))
    device, _, _ = setup(cfg)  # the architecture is --init_from's, kept in the checkpoint
    require(cfg.init_from or ckpt, "finetune needs --init_from a checkpoint of gpt.py pretrain, or hf:DIR")
    gpt, tok, cfg = load_pretrained(cfg, ckpt, weights=not cfg.finetune_random_init)
    require(tok and "<|extract|>" in tok.specials, f"{cfg.init_from} has no [extract] token: fine-tune a gpt.py LM")
    name, train_rows, dev_rows = load_classification(cfg.finetune_data, cfg.seed)
    if 0 < cfg.finetune_examples < len(train_rows):  # the same rows in both arms: the draw depends on --seed only
        train_rows = random.Random(cfg.seed).sample(train_rows, cfg.finetune_examples)
    label_list = ckpt["labels"] if ckpt else sorted({label for label, _ in train_rows})
    labels = {label: i for i, label in enumerate(label_list)}
    train, dev = (encode_classification(rows, tok, labels, cfg.block_size, split)
                  for rows, split in ((train_rows, "train"), (dev_rows, "dev")))
    model, batches = GPTClassifier(gpt, len(labels), cfg.clf_dropout).to(device), EpochSampler(
        train, cfg.finetune_batch_size, cfg.seed)
    total = batches.per_epoch * cfg.finetune_epochs
    log0(f"fine-tuning on {name} from {'RANDOM INIT' if cfg.finetune_random_init else cfg.init_from}: {len(train)} "
         f"train / {len(dev)} dev examples, labels {label_list}, {total} steps")
    def evaluate(m):
        correct, loss_sum = 0, 0.0
        for i in range(0, len(dev), cfg.finetune_batch_size):
            b = {k: v.to(device) for k, v in collate(dev[i:i + cfg.finetune_batch_size]).items()}
            logits, known = m(b["input_ids"], b["lengths"])[0], b["labels"] >= 0
            correct += (logits.argmax(-1) == b["labels"]).sum().item()
            loss_sum += F.cross_entropy(logits.float()[known], b["labels"][known], reduction="sum").item()
        return {"loss": loss_sum / len(dev), "acc": correct / len(dev)}
    opt = adamw(model, cfg.finetune_lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), 1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_then_decay(math.ceil(cfg.finetune_warmup * total), total,
                                                                     shape="linear"))
    tokens = round(cfg.finetune_batch_size * cfg.grad_accum * sum(len(e["ids"]) for e in train) / len(train))
    return {**train_loop(cfg, "finetune", model, opt, sched, batches, lambda m, b: finetune_loss(m, b, cfg.lm_coef)[0],
                         evaluate, ckpt, total=total, tokens=tokens, flops=gpt.flops_per_token(), metric="acc",
                         extra={"tokenizer": tok.state(), "labels": label_list}), "data": name, "examples": len(train)}

def sample(cfg: Config) -> dict:
    """text continuing --prompt, from a checkpoint or hf:DIR (--init_from)"""
    require(cfg.init_from, "sample needs --init_from a checkpoint (out_dir/ckpt.pt) or hf:DIR")
    (model, tok, _), (device, _, ctx) = load_pretrained(cfg), setup(cfg)
    require(tok, f"{cfg.init_from} has no tokenizer (vocab.json and merges.txt) to encode the prompt")
    ids, block = tok.encode(cfg.prompt), model.cfg.block_size
    require(ids, "--prompt encodes to no tokens; give some text")
    len(ids) > block and log0(f"warning: the prompt has {len(ids)} tokens; only its last {block} fit the context "
                               "and are used")
    torch.manual_seed(cfg.seed)
    with ctx:
        out = generate(model.to(device), torch.tensor([ids[-block:]] * cfg.num_samples, device=device),
                       cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p)
    texts = [tok.decode(row) for row in out.tolist()]
    log0(*(t + "\n" + "-" * 60 for t in texts), sep="\n")
    return {"samples": texts}

def load_hf(root: Path, cfg: Config) -> tuple[GPT, ByteBPE | None, Config]:
    """A Hugging Face OpenAIGPTLMHeadModel or GPT2LMHeadModel folder as a GPT (their Conv1D layers store
    weights as (in, out): transposed here), and GPT-2's vocab.json and merges.txt as its tokenizer. GPT-1's
    character BPE is not read, so sampling text from GPT-1 weights needs token ids."""
    require((root / "config.json").is_file(), f"{root} has no config.json: hf:DIR needs a Hugging Face model folder")
    hf = json.loads(read_text(root / "config.json"))
    kind, act = hf.get("model_type"), hf.get("afn", hf.get("activation_function", "gelu_new"))
    require(kind in ("openai-gpt", "gpt2"), f"{root} holds a {kind} model; only openai-gpt and gpt2 load into gpt.py")
    require(act in ("gelu", "gelu_new", "gelu_pytorch_tanh") and (kind, act) != ("gpt2", "gelu"),  # openai-gpt's
            f"{root} uses the activation {act}; gpt.py runs the tanh form of GELU only")  # gelu is the tanh form
    if (root / "model.safetensors").is_file():
        require(importlib.util.find_spec("safetensors"), "reading model.safetensors needs: pip install safetensors")
        sd = importlib.import_module("safetensors.torch").load_file(str(root / "model.safetensors"))
    else:
        require((root / "pytorch_model.bin").is_file(), f"{root} has neither model.safetensors nor pytorch_model.bin")
        sd = torch.load(root / "pytorch_model.bin", map_location="cpu", weights_only=True)
    sd = {k.removeprefix("transformer."): v for k, v in sd.items()}
    cfg = dataclasses.replace(cfg, arch="gpt1" if kind == "openai-gpt" else "gpt2", n_layer=hf["n_layer"], n_head=hf[
        "n_head"], d_model=hf["n_embd"], block_size=hf["n_positions"], vocab_size=hf["vocab_size"])
    model, state = build_model(cfg), {}
    for ours, ref in model.state_dict().items():  # blocks.3.attn.qkv.weight -> h.3.attn.c_attn.weight
        theirs = re.sub(r"blocks\.(\d+)\.", r"h.\1.", ours).replace("qkv", "c_attn").replace(".proj", ".c_proj")
        theirs = theirs.replace(".fc", ".c_fc").replace("wte", "tokens_embed" if kind == "openai-gpt" else "wte")
        theirs = theirs.replace("wpe", "positions_embed" if kind == "openai-gpt" else "wpe")
        require(theirs in sd, f"{root} has no weight {theirs}; is it a complete {kind} checkpoint?")
        state[ours] = sd[theirs].t() if sd[theirs].dim() == 2 and ours.startswith("blocks.") else sd[theirs]
        require(state[ours].shape == ref.shape, f"{root}: {theirs} has shape {tuple(sd[theirs].shape)}")
    model.load_state_dict(state)
    if not ((root / "vocab.json").is_file() and (root / "merges.txt").is_file()):
        return model, None, cfg
    # GPT-2 writes each byte as a printable character: printable latin-1 as itself, the others from chr(256) on
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    as_byte = {chr(b): b for b in keep} | {chr(256 + i): b for i, b in enumerate(sorted(set(range(256)) - set(keep)))}
    vocab = json.loads(read_text(root / "vocab.json"))
    pieces = [bytes(as_byte[c] for c in t) for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    id_of = {p: i for i, p in enumerate(pieces)}
    merges = [tuple(id_of[bytes(as_byte[c] for c in half)] for half in line.split(" "))
              for line in read_text(root / "merges.txt").split("\n") if line and not line.startswith("#version")]
    return model, ByteBPE(merges, (), pieces), cfg

def main_job(cfg: Config) -> dict:
    """pretrain (out_dir/pretrain), sample from its best checkpoint, fine-tune from that (out_dir/finetune) and from
    random init (out_dir/scratch: Table 5's "no pre-training"), the same recipe, labels and seed; the claim line"""
    root = Path(cfg.out_dir)
    pre, best = pretrain(dataclasses.replace(cfg, out_dir=str(root / "pretrain"))), str(root / "pretrain" / "best.pt")
    RANK == 0 and sample(dataclasses.replace(cfg, init_from=best))
    arms = {arm: finetune(dataclasses.replace(cfg, out_dir=str(root / arm), init_from=best, resume=cfg.resume and (
        root / arm / "ckpt.pt").exists(), finetune_random_init=arm == "scratch")) for arm in ("finetune", "scratch")}
    (task, n), (w, wo) = (arms["finetune"][k] for k in ("data", "examples")), (100 * a["acc"] for a in arms.values())
    differs = (f"GPT pretrained on {pre['data']}, {pre['step']:,} steps, val ppl {math.exp(pre['best']):.1f}, vs "
               f"random init; {n:,} labels, the same fine-tuning")
    log_metrics(root, f"claim: {task} dev accuracy {w:.1f} vs {wo:.1f} ({differs})", split="claim", task=task,
                metric="dev accuracy", **{"with": w, "without": wo}, differs=differs)
    return {"pretrain": pre, **arms, "claim": {"with": w, "without": wo, "differs": differs}}

# ==== harness: the same in all six scripts (tests/test_copies.py checks) ====
# Plumbing, not the paper: datasets, devices, DDP, checkpoints, the training loop, logs, the command line.

SCRIPT = Path(__file__).name  # written into checkpoints: each script reads only its own
RANK, WORLD = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
RNGS = ((random.getstate, random.setstate), (np.random.get_state, np.random.set_state),
        (torch.get_rng_state, torch.set_rng_state), (torch.cuda.get_rng_state_all, torch.cuda.set_rng_state_all))
log0 = functools.partial(print, flush=True) if RANK == 0 else lambda *args, **kwargs: None  # rank 0 speaks

class UserError(Exception):
    """Bad input: main() prints it as one line `error: ...` and exits with status 2."""

def require(ok, message: str) -> None:
    if not ok:
        raise UserError(message)

def download(name: str, fallback: str) -> Path | None:
    """The cache folder of DATASETS[name], each file downloaded once and checked against its sha256.
    Without a network: one line saying that `fallback` is used instead, and None."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "nlp-lineage"
    root = Path(os.environ.get("NLP_LINEAGE_CACHE") or cache) / name
    for fname, (url, sha) in DATASETS[name].items():
        if not (root / fname).exists():
            try:
                with urllib.request.urlopen(url, timeout=30) as r:
                    data = r.read()
            except OSError as e:
                return log0(f"offline ({e.__class__.__name__}): using {fallback} instead of {name}")
            require(hashlib.sha256(data).hexdigest() == sha, f"{url} does not match its known sha256; not used")
            root.mkdir(parents=True, exist_ok=True)
            (root / f"{fname}.{os.getpid()}").write_bytes(data)
            os.replace(root / f"{fname}.{os.getpid()}", root / fname)
    return root

def read_text(path) -> str:
    """A UTF-8 text file with \\n line ends. Split it at \\n only: U+2028, NEL and such may stand in a sentence."""
    require(Path(path).is_file(), f"data file {path} does not exist")
    try:
        text = Path(path).read_text(encoding="utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    require(text.strip(), f"data file {path} is empty")
    return text

def setup(cfg) -> tuple[torch.device, torch.dtype, torch.autocast]:
    """Device (auto: cuda, mps, cpu), autocast dtype (auto: bf16 where the device runs it fast, else fp32;
    NLP_LINEAGE_AUTO_DTYPE in the environment sets what auto means), TF32, and under torchrun DDP."""
    name = cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else \
        "mps" if torch.backends.mps.is_available() else "cpu"
    require(re.fullmatch(r"cpu|mps|cuda(:\d+)?", name), f"--device must be auto, cpu, cuda[:N] or mps, not {name!r}")
    require(name == "cpu" or (torch.backends.mps if name == "mps" else torch.cuda).is_available(), f"no {name} here")
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if name == "cuda" else name)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 matmuls on CUDA
    device.type == "cuda" and torch.cuda.set_device(device)
    dtype = cfg.dtype if cfg.dtype != "auto" else os.environ.get("NLP_LINEAGE_AUTO_DTYPE", "auto")
    if dtype == "auto":
        cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
        fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else "avx512_bf16" in cpu or "amx_bf16" in cpu
        dtype = "bfloat16" if fast and device.type != "mps" else "float32"
    require(dtype in ("float32", "bfloat16", "float16"), f"NLP_LINEAGE_AUTO_DTYPE must be a --dtype, not {dtype!r}")
    if WORLD > 1 and not dist.is_initialized():  # one process group for all the stages of a main job
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
    return device, getattr(torch, dtype), torch.autocast(device.type, getattr(torch, dtype), enabled=dtype != "float32")

def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a temporary file, fsync, then a rename over the old one; a crash leaves one or the other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")  # a failed write leaves this, never a broken checkpoint
    with open(tmp, "wb") as f:
        torch.save(state, f)
        os.fsync(f.fileno())
    os.replace(tmp, path)

def load_checkpoint(path, stages=()) -> dict:
    """A checkpoint that this script wrote, of one of `stages` (any, when empty); anything else is one line."""
    require(Path(path).is_file(), f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{path} is not a readable checkpoint ({e.__class__.__name__})") from None
    script = ckpt.get("script", "another program") if isinstance(ckpt, dict) else "another program"
    require(script == SCRIPT, f"{path} was written by {script}, not by {SCRIPT}")
    stage = ckpt.get("stage")
    require(not stages or stage in stages, f"{path} is a {stage} checkpoint, not {' or '.join(stages)}")
    return ckpt

def open_run(cfg, stage: str, fields=()) -> dict | None:
    """The start of a training stage: seed, check out_dir before anything is read or written, and with
    --resume return its checkpoint, which must agree on `fields` (but those at 0 or "": derived from the data)."""
    for seed in (torch.manual_seed, random.seed, np.random.seed):
        seed(cfg.seed + RANK)
    out = Path(cfg.out_dir)
    parent = next(p for p in (out, *out.parents) if p.exists())  # out_dir, or the folder it will be made in
    require(parent.is_dir() and os.access(parent, os.W_OK), f"--out_dir {out} is not a folder that can be written")
    require(cfg.resume or not (out / "ckpt.pt").exists(), f"{out} holds a run: continue it with --resume or give "
            "another --out_dir")
    ckpt = load_checkpoint(out / "ckpt.pt", (stage,)) if cfg.resume else None
    for f in [f for f in fields if ckpt and (v := getattr(cfg, f)) != ckpt["config"].get(f) and (v or v is False)]:
        raise UserError(f"{out} was trained with --{f} {ckpt['config'].get(f)}, not {getattr(cfg, f)}")
    return ckpt

def log_metrics(out, text: str, **record) -> None:
    """`text` for people on stdout, and `record` as one JSON line in out_dir/metrics.jsonl (rank 0 only)."""
    if RANK == 0:
        print(text, flush=True)
        with open(Path(out) / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

def train_loop(cfg, stage: str, model: nn.Module, opt, sched, batches, loss_fn, evaluate, ckpt=None, *,
               total: int, tokens: int, flops=0.0, extra=None, metric="loss", patience=0, keep_best=False,
               on_step=None, clip=None) -> dict:
    """Every training stage: `total` steps (--max_steps stops early) of grad_accum batches (DDP syncs on the
    last) through loss_fn(model, batch) under autocast, clipping (each group of clip(model) alone), opt, sched.
    Every eval_interval steps and at the end: evaluate(model) -> metrics, an atomic checkpoint (keep_best: and
    best.pt when `metric` improves; `patience` evaluations without that stop the run). on_step(step) starts a
    step; True: it changed which parameters train. batches.position is all --resume needs of the data (any state
    carried between batches too) to continue exactly. Ctrl-C: the step completes, is saved, then exit 130."""
    device, dtype, ctx = setup(cfg)
    raw, out, t0, higher = model, Path(cfg.out_dir), time.time(), metric in ("acc", "f1", "bleu")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    parts = {"model": raw, "optimizer": opt, "scheduler": sched, "scaler": scaler}
    step, best, stale = (ckpt["step"], ckpt["best"], ckpt["stale"]) if ckpt else (0, None, 0)
    if ckpt:
        for key, part in parts.items():
            part and part.load_state_dict(ckpt[key])
        mine = ckpt["data"][RANK if len(ckpt["data"]) == WORLD else 0]
        batches.position = mine["position"]
        for (_, put), state in zip(RNGS, mine["rng"]):
            put(state)
        log0(f"resumed {stage} from {out / 'ckpt.pt'} at step {step}")
    RANK == 0 and out.mkdir(parents=True, exist_ok=True)
    n = 8192 if device.type == "cuda" else 1024  # the matmul peak, MFU's denominator: sizes that are compute-bound
    a, sync = torch.full((n, n), 0.5, device=device, dtype=dtype), getattr(torch, device.type).synchronize
    a @ a, sync()  # a warm-up (of constant inputs: no random numbers drawn, so resume stays exact)
    t_peak = time.perf_counter()
    [a @ a for _ in range(5)], sync()
    peak = 5 * 2 * n ** 3 / (time.perf_counter() - t_peak)

    def wrap():  # DDP registers the parameters that train now
        m = torch.compile(raw) if cfg.compile else raw
        return nn.parallel.DistributedDataParallel(m) if WORLD > 1 else m
    def save(improved=False):  # every rank's data position and RNGs; rank 0 writes
        data = [{"position": batches.position, "rng": [get() for get, _ in RNGS]}] * WORLD
        WORLD > 1 and dist.all_gather_object(data, data[0])
        state = {"script": SCRIPT, "stage": stage, "config": dataclasses.asdict(cfg), "step": step, "best": best,
                 "stale": stale, "data": data, **(extra or {}), **{k: p.state_dict() for k, p in parts.items() if p}}
        for path in [out / "ckpt.pt"] + [out / "best.pt"] * (keep_best and improved) if RANK == 0 else []:
            save_checkpoint(path, state)
            (out / "config.json").write_text(json.dumps(state["config"], indent=1))
    def evaluate_and_save():
        nonlocal best, stale
        with torch.no_grad(), ctx:
            metrics = evaluate(raw.eval())
        raw.train()
        require(all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)) and all(p.isfinite().all()
                for p in raw.parameters()), f"{stage} diverged by step {step}; stopped, {out}/ckpt.pt is from before")
        shown = " | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        log_metrics(out, f"step {step}/{total} | val {shown}", step=step, split="val", **metrics)
        improved = best is None or (metrics[metric] > best if higher else metrics[metric] < best)
        best, stale = (metrics[metric], 0) if improved else (best, stale + 1)
        save(improved)
        return metrics
    on_sigint = lambda *_: stopping.append((signal.signal(signal.SIGINT, signal.default_int_handler),  # then a 2nd
                                            log0("Ctrl-C: stopping after this step (again: stop at once, unsaved)")))

    stopping, metrics, start, stop, nonfinite = [], {}, step, min(total, cfg.max_steps or total), torch.zeros(())
    handler = signal.signal(signal.SIGINT, on_sigint) if threading.current_thread() is threading.main_thread() else None
    model, hms, t_last, logged = wrap(), lambda s: f"{s // 60:.0f}:{s % 60:02.0f}", time.time(), step
    try:
        while step < stop:
            if on_step and on_step(step):
                model = wrap()
            for micro in range(cfg.grad_accum):
                batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
                with contextlib.nullcontext() if micro == cfg.grad_accum - 1 or WORLD == 1 else model.no_sync():
                    with ctx:
                        loss = loss_fn(model, batch)
                    scaler.scale(loss / cfg.grad_accum).backward()
                nonfinite = torch.where((nonfinite == 0) & ~loss.detach().isfinite(), step + 1.0, nonfinite)  # no sync
            scaler.unscale_(opt)
            for group in (clip(raw) if clip else [raw.parameters()]) if cfg.grad_clip > 0 else []:
                nn.utils.clip_grad_norm_([p for p in group if p.requires_grad], cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            sched and sched.step()
            step += 1
            flag = torch.tensor(float(bool(stopping)), device=device if WORLD > 1 and device.type == "cuda" else "cpu")
            WORLD > 1 and dist.all_reduce(flag, dist.ReduceOp.MAX)  # all ranks stop at the same step
            evaluating = step % cfg.eval_interval == 0 or step == stop
            if step % cfg.log_interval == 0 or evaluating or flag.item():
                require(not nonfinite, f"the loss became {loss.item()} at step {nonfinite:.0f}; stopped, {out}/ckpt.pt "
                        "(if any) is from before (try a lower learning rate)")
                now, lr = time.time(), max(g["lr"] for g in opt.param_groups)
                tok_s, logged = (step - logged) * tokens * WORLD / (now - t_last), step
                eta, mfu, t_last = (now - t0) / (step - start) * (stop - step), tok_s * flops / WORLD / peak, now
                text = f"loss {loss.item():.4g} | lr {lr:.1e} | {tok_s:,.0f} tok/s | mfu {mfu:.1%} | {hms(now - t0)}"
                log_metrics(out, f"step {step}/{total} | {text} elapsed, eta {hms(eta)}", step=step, split="train",
                            loss=loss.item(), lr=lr, tok_s=tok_s, mfu=mfu, elapsed=now - t0, eta=eta)
            metrics = evaluate_and_save() if evaluating else metrics
            if flag.item():
                evaluating or save()
                log0(f"interrupted: saved {out / 'ckpt.pt'} at step {step}; continue with --resume")
                raise SystemExit(130)
            if patience and stale >= patience and step < stop:
                log0(f"early stopping at step {step}: no better dev {metric} in {patience} evaluations")
                break
    finally:
        handler and signal.signal(signal.SIGINT, handler)
    metrics = metrics or evaluate_and_save()  # resumed at the end of its schedule: evaluate once more
    WORLD > 1 and dist.barrier()  # the checkpoint is on disk before any rank starts a next stage from it
    return {"step": step, **metrics, "best": best}

def parse_config(argv, stages: dict):
    """`[STAGE] [--preset P] [--FIELD VALUE ...]`: a flag per Config field with its choices and its presets'
    values, grouped and explained by Config's own comments; numbers must be finite."""
    doc = "\n".join(f"  {n or '(none)':12} {fn.__doc__.strip().splitlines()[0]}" for n, fn in stages.items())
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="stages:\n" + doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: require(False, message)  # one line, exit status 2
    p.add_argument("stage", nargs="?", choices=[s for s in stages if s], help="what to run (none: the main job)")
    p.add_argument("--preset", default="small", choices=list(PRESETS), help="the values of the fields below")
    kinds, group = typing.get_type_hints(Config), p
    for line in inspect.getsource(Config).splitlines():
        if m := re.fullmatch(r"    # (.+)", line):
            group = p.add_argument_group(m[1])
        elif m := re.fullmatch(r"    (\w+): .+? = .+?(?:  # (.*))?", line):
            kind = kinds[m[1]]
            how = dict(action=argparse.BooleanOptionalAction) if kind is bool else dict(
                choices=typing.get_args(kind) or None, type=kind if kind in (int, float) else str)
            vals = {name: repr(getattr(c, m[1])) for name, c in PRESETS.items()}
            vals = ", ".join(f"{k} {v}" for k, v in vals.items()) if len(set(vals.values())) > 1 else vals["paper"]
            group.add_argument(f"--{m[1]}", help=f"{m[2] or ''} [{vals}]".replace("%", "%%"), **how)
    args = vars(p.parse_args(argv))
    stage, preset = args.pop("stage"), args.pop("preset")
    for k, v in args.items():
        require(not isinstance(v, float) or math.isfinite(v), f"--{k} must be a finite number, not {v}")
    return stage, dataclasses.replace(PRESETS[preset], **{k: v for k, v in args.items() if v is not None})

def run_main(argv, stages: dict):
    """Parse, check and run a stage (None: the main job); bad input and Ctrl-C end in one line."""
    try:
        stage, cfg = parse_config(argv, stages)
        validate(cfg)
        return stages[stage](cfg)
    except (UserError, KeyboardInterrupt) as e:  # bad input: status 2; Ctrl-C outside the loop's steps: 130
        print(f"error: {e}" if isinstance(e, UserError) else "interrupted: nothing more was saved", file=sys.stderr)
        sys.exit(2 if isinstance(e, UserError) else 130)
# ==== end of harness ====

def main(argv=None) -> dict:
    return run_main(argv, {None: main_job, "pretrain": pretrain, "finetune": finetune, "sample": sample})

if __name__ == "__main__":
    main()
