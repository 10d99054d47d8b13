"""The Transformer: an encoder-decoder built on attention alone, trained to translate.

Paper: Ashish Vaswani, Noam Shazeer, Niki Parmar, Jakob Uszkoreit, Llion Jones, Aidan N. Gomez, Lukasz Kaiser,
Illia Polosukhin, "Attention Is All You Need", NeurIPS 2017, arXiv:1706.03762.

What this file reproduces
  - Section 3: encoder and decoder layers, each sublayer post-LN, `LayerNorm(x + Dropout(Sublayer(x)))`; multi-head
    attention (eq. 1) within the source, within the target so far (masked) and from the target to the encoder's
    output; the ReLU feed-forward network (eq. 2); sinusoidal positions; embeddings times sqrt(d_model), one matrix
    for the source and target embeddings and the output layer (a shared vocabulary).
  - Section 5: batches of pairs of similar length, about 25,000 source + 25,000 target tokens; Adam (0.9, 0.98,
    1e-9) with eq. 3's warmup then inverse square root decay; dropout 0.1; label smoothing 0.1.
  - Section 6.1: beam search (beam 4, length penalty alpha 0.6, at most input length + 50 tokens, keys and values
    cached); averaging the last 5 checkpoints (copies kept at each evaluation); BLEU as sacreBLEU's (13a tokens).

Run it (`--help` lists every field, grouped by stage)
  python transformer.py                  # main job: small preset, Multi30k de->en, average; BLEU of beam 4 vs greedy
  python transformer.py train --data multi30k --out_dir out/m30k
  python transformer.py average --init_from out/m30k --out_dir out/avg     # or --init_from a.pt,b.pt,c.pt
  python transformer.py test --init_from out/avg/ckpt.pt --beam_size 1 --out_dir out/greedy    # the test BLEU
  python transformer.py translate --init_from out/avg/ckpt.pt < sentences.de > sentences.en
  torchrun --nproc_per_node=2 transformer.py train ...                           # data parallel

Data: multi30k (task 1, raw cased), a folder with {train,val,test}.{src,tgt} (test or test_2016_flickr, else val),
or builtin: a SYNTHETIC copy task (8 random digits), offline and in tests. A pair over --max_len names one that fits.

Deliberate deviations from the paper
  - Vocabulary: a byte-level BPE (GPT-2's, as gpt.py) over both languages, 4k tokens in `small`, <s> </s> <pad>
    last; the paper had a shared byte-pair encoding of about 37k tokens for EN-DE, 32k word-pieces for EN-FR.
    The source ends in </s> (as fairseq's), so an empty line still has a key to attend to.
  - Unstated in the paper: Xavier-uniform Linear weights, the embedding N(0, d_model^-0.5) (unit variance once
    scaled), LayerNorm eps 1e-6 (tensor2tensor, fairseq). No attention or ReLU dropout: the paper has neither.
  - `small` fits 10 minutes on 2 CPU cores: 3 + 3 layers of width 256, d_ff 512, no dropout, 2,000-token batches, 1,500
    steps, warmup 150; eq. 3 peaks higher as d_model and warmup shrink, so `lr_factor` (1 in the paper) scales it: 0.145
    small, 0.3 tiny. `small` keeps no copies to average: in a run this short, copies 200 steps apart average worse.
  - Dropped: the `norm_first` (pre-LN) option, never in the paper, and the separate greedy decoder: beam search
    with --beam_size 1 picks the same tokens (tests/test_transformer.py checks it).
"""

from __future__ import annotations

import argparse, atexit, contextlib, dataclasses, functools, gzip, hashlib, heapq, inspect, json, math, os, random
import re, signal, sys, threading, time, typing, unicodedata, urllib.request
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
    # model (section 3: the base model of Table 3)
    n_layer: int = 6  # N, in the encoder and in the decoder
    d_model: int = 512
    d_ff: int = 2048  # the inner layer of the feed-forward networks (eq. 2)
    n_head: int = 8  # h; d_k = d_v = d_model / h
    dropout: float = 0.1  # P_drop, on every sublayer output and on the embedding sums (section 5.4)
    max_len: int = 256  # the longest source or target in tokens (sinusoids are computed, so any model runs at any)
    vocab_size: int = 0  # the shared vocabulary, <s> </s> <pad> last; 0: the tokenizer's size
    # data and vocabulary (section 5.1)
    data: str = "multi30k"  # multi30k, builtin, or a folder with {train,val,test}.{src,tgt}
    src: str = "de"  # the source language: its files' suffix
    tgt: str = "en"
    bpe_vocab_size: int = 37000  # one BPE for both languages (about 37,000 tokens for WMT EN-DE)
    # train (sections 5.1-5.4)
    batch_tokens: int = 50000  # source + target tokens per batch, padding included (about 25,000 + 25,000)
    grad_accum: int = 1  # batches per optimizer step
    warmup_steps: int = 4000
    lr_factor: float = 1.0  # multiplies eq. 3 (1 in the paper; the Annotated Transformer's `factor`)
    total_steps: int = 100_000  # the schedule's length: the base model's 100k steps
    beta1: float = 0.9
    beta2: float = 0.98
    adam_eps: float = 1e-9
    weight_decay: float = 0.0  # none in the paper; decoupled, on matrices only
    grad_clip: float = 0.0  # none in the paper; 0: no clipping
    label_smoothing: float = 0.1  # epsilon_ls (section 5.4)
    keep_checkpoints: int = 5  # copies ckpt_STEP.pt of the weights at the last 5 evaluations, for average (0: none)
    # translate and average (section 6.1; also the test BLEU that ends train)
    beam_size: int = 4  # 1: greedy search
    length_penalty: float = 0.6  # alpha in ((5 + |Y|) / 6)^alpha
    max_extra_len: int = 50  # the longest output: input length + 50
    average_last: int = 5  # --init_from a folder: average its last 5 kept copies (the paper's, base model)
    # run control
    out_dir: str = "out/transformer"
    init_from: str = ""  # train, translate: a checkpoint; average: a training out_dir, or checkpoints a.pt,b.pt
    resume: bool = False  # continue the run in out_dir exactly
    max_steps: int = 0  # stop this run at this step (0: run the whole schedule)
    eval_interval: int = 1000  # the loss over the validation split, a checkpoint and a kept copy
    log_interval: int = 100
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # autocast; master weights stay fp32
    compile: bool = False  # torch.compile the model
    seed: int = 1337

PRESETS = {
    "paper": Config(),  # 6 + 6 layers, d_model 512: 63.1M parameters with a 37,000-token vocabulary
    "small": Config(n_layer=3, d_model=256, d_ff=512, n_head=4, dropout=0.0, bpe_vocab_size=4000, batch_tokens=2000,
                    warmup_steps=150, lr_factor=0.145, total_steps=1500, eval_interval=500, keep_checkpoints=0),
    "tiny": Config(n_layer=2, d_model=64, d_ff=128, n_head=4, dropout=0.0, max_len=64, bpe_vocab_size=300,
                   batch_tokens=1600, warmup_steps=30, lr_factor=0.3, total_steps=300, eval_interval=300,
                   log_interval=100, keep_checkpoints=0, beam_size=2, max_extra_len=10),
}
ARCH_FIELDS = ("n_layer", "d_model", "d_ff", "n_head", "vocab_size")

def validate(cfg: Config) -> None:
    for name in ("n_layer", "d_model", "d_ff", "n_head", "max_len", "batch_tokens", "grad_accum", "warmup_steps",
                 "lr_factor", "total_steps", "adam_eps", "beam_size", "average_last", "eval_interval", "log_interval"):
        require(getattr(cfg, name) > 0, f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("vocab_size", "weight_decay", "grad_clip", "keep_checkpoints", "length_penalty", "max_extra_len",
                 "max_steps"):
        require(getattr(cfg, name) >= 0, f"--{name} must not be negative, got {getattr(cfg, name)}")
    require(cfg.d_model % cfg.n_head == 0 and cfg.d_model % 2 == 0, f"--n_head {cfg.n_head} must divide --d_model "
            f"{cfg.d_model}, which must be even (sines and cosines come in pairs)")
    require(0 <= cfg.dropout < 1 and 0 <= cfg.label_smoothing < 1 and 0 < cfg.beta1 < 1 and 0 < cfg.beta2 < 1,
            "--dropout and --label_smoothing must be in [0, 1), --beta1 and --beta2 in (0, 1)")
    require(cfg.bpe_vocab_size >= 259, "--bpe_vocab_size must be at least 259 (256 bytes and 3 special tokens)")

# -----------------------------------------------------------------------------------------------------
# Model (section 3)

def sinusoids(n_pos: int, d_model: int) -> torch.Tensor:
    """Section 3.5: PE(pos, 2i) = sin(pos / 10000^(2i/d_model)), PE(pos, 2i+1) = cos(the same); (n_pos, d_model)."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    angle = pos / 10000 ** (torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (n_pos, d_model/2)
    return rearrange([angle.sin(), angle.cos()], "two p i -> p (i two)").float()  # interleaved, not two halves

class MultiHeadAttention(nn.Module):
    """Section 3.2: MultiHead(Q, K, V) = Concat(head_1..head_h) W^O, head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)."""
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head, self.q, self.k, self.v, self.o = cfg.n_head, *(nn.Linear(cfg.d_model, cfg.d_model) for _ in "qkvo")

    def forward(self, x, kv, mask=None, cache=None, static=False):
        """x (B, T, C) attends to kv (B, S, C) where mask is True; cache {k, v}: extended, or filled once if static."""
        q = rearrange(self.q(x), "b t (h d) -> b h t d", h=self.n_head)
        if static and cache:
            k, v = cache["k"], cache["v"]
        else:
            k, v = (rearrange(proj(kv), "b s (h d) -> b h s d", h=self.n_head) for proj in (self.k, self.v))
            if cache is not None:
                k, v = (torch.cat([cache[n], x], dim=2) if cache else x for n, x in (("k", k), ("v", v)))
                cache.update(k=k, v=v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # softmax(Q K^T / sqrt(d_k)) V (eq. 1)
        return self.o(rearrange(y, "b h t d -> b t (h d)"))  # (B, T, C)

class FeedForward(nn.Module):
    """Eq. 2: FFN(x) = max(0, x W_1 + b_1) W_2 + b_2, the same at every position."""
    def __init__(self, cfg: Config):
        super().__init__()
        self.w_1, self.w_2 = nn.Linear(cfg.d_model, cfg.d_ff), nn.Linear(cfg.d_ff, cfg.d_model)

    def forward(self, x):
        return self.w_2(F.relu(self.w_1(x)))

class EncoderLayer(nn.Module):
    """Section 3.1: self-attention, then the feed-forward network, each as LayerNorm(x + Dropout(f(x))) (5.4)."""
    def __init__(self, cfg: Config):
        super().__init__()
        self.self_attn, self.ff, self.drop = MultiHeadAttention(cfg), FeedForward(cfg), nn.Dropout(cfg.dropout)
        self.norm_1, self.norm_2 = (nn.LayerNorm(cfg.d_model, eps=1e-6) for _ in range(2))

    def forward(self, x, src_mask):  # (B, S, C), (B, 1, 1, S)
        x = self.norm_1(x + self.drop(self.self_attn(x, x, src_mask)))
        return self.norm_2(x + self.drop(self.ff(x)))

class DecoderLayer(nn.Module):
    """Section 3.1: masked self-attention, attention over the encoder's output, then the feed-forward network."""
    def __init__(self, cfg: Config):
        super().__init__()
        self.self_attn, self.cross_attn, self.ff = MultiHeadAttention(cfg), MultiHeadAttention(cfg), FeedForward(cfg)
        self.norm_1, self.norm_2, self.norm_3 = (nn.LayerNorm(cfg.d_model, eps=1e-6) for _ in range(3))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, y, memory, src_mask, tgt_mask, cache=None):  # (B, T, C), (B, S, C)
        y = self.norm_1(y + self.drop(self.self_attn(y, y, tgt_mask, cache and cache["self"])))
        y = self.norm_2(y + self.drop(self.cross_attn(y, memory, src_mask, cache and cache["cross"], static=True)))
        return self.norm_3(y + self.drop(self.ff(y)))

class Transformer(nn.Module):
    """Figure 1: the decoder predicts each target token from the ones before it and the encoder's output."""
    def __init__(self, cfg: Config):
        super().__init__()
        require(cfg.vocab_size > 3, "--vocab_size must be positive (the tokenizer sets it when data is loaded)")
        self.cfg, self.drop = cfg, nn.Dropout(cfg.dropout)
        self.bos, self.eos, self.pad = cfg.vocab_size - 3, cfg.vocab_size - 2, cfg.vocab_size - 1  # SPECIALS
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)  # source, target and pre-softmax (section 3.4)
        self.register_buffer("pe", sinusoids(cfg.max_len, cfg.d_model), persistent=False)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_layer))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
        for name, p in self.named_parameters():  # the paper gives none: see the docstring
            if p.dim() == 2:
                nn.init.normal_(p, std=cfg.d_model ** -0.5) if name == "embed.weight" else nn.init.xavier_uniform_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def embed_tokens(self, ids, start: int = 0):
        """Embedding * sqrt(d_model) + the sinusoids of positions start.., then dropout (3.4, 3.5, 5.4); (B, T, C)."""
        end = start + ids.size(1)
        require(end <= self.cfg.max_len, f"a sequence of {end} tokens is longer than --max_len {self.cfg.max_len}")
        return self.drop(self.embed(ids) * math.sqrt(self.cfg.d_model) + self.pe[start:end])

    def encode(self, src, src_mask=None):
        """src (B, S) -> memory (B, S, C) and the mask (B, 1, 1, S) of its real tokens (default: all but <pad>)."""
        src_mask = (src != self.pad if src_mask is None else src_mask)[:, None, None, :]
        x = self.embed_tokens(src)
        for layer in self.encoder:
            x = layer(x, src_mask)
        return x, src_mask

    def decode(self, tgt_in, memory, src_mask, cache=None):
        """tgt_in (B, T) -> states (B, T, C); position t sees the target up to t; a cache holds the earlier ones."""
        T, start = tgt_in.size(1), (cache[0]["self"]["k"].size(2) if cache and cache[0]["self"] else 0)
        causal = torch.ones(T, start + T, dtype=torch.bool, device=tgt_in.device).tril(diagonal=start)  # (T, S)
        y = self.embed_tokens(tgt_in, start)
        for i, layer in enumerate(self.decoder):
            y = layer(y, memory, src_mask, causal, cache and cache[i])
        return y

    def forward(self, src, tgt_in, src_mask=None):
        """Next-token logits (B, T, V): the decoder's states times the shared embedding matrix (section 3.4)."""
        memory, src_mask = self.encode(src, src_mask)
        return self.decode(tgt_in, memory, src_mask) @ self.embed.weight.T

    def flops_per_token(self, src_len: float, tgt_len: float) -> float:
        """Training FLOPs per token: 6 per weight per token that uses it, 12 d_model per query-key pair (PaLM)."""
        n_enc = sum(p.numel() for p in self.encoder.parameters())  # used by source tokens
        n_dec = sum(p.numel() for p in self.parameters()) - n_enc  # the decoder and the shared output layer
        pairs = self.cfg.n_layer * (src_len ** 2 + tgt_len ** 2 + src_len * tgt_len)
        return (6 * (n_enc * src_len + n_dec * tgt_len) + 12 * self.cfg.d_model * pairs) / (src_len + tgt_len)

build_model = Transformer

# -----------------------------------------------------------------------------------------------------
# Objective (section 5.4): label-smoothed cross-entropy, in fp32

def pretrain_loss(model, batch: dict, label_smoothing: float = 0.1) -> torch.Tensor:
    """Cross-entropy against q = (1 - eps) one_hot(y) + eps / V, the label smoothing of Szegedy et al. (2016) that
    section 5.4 cites, over the target's real tokens (<pad>, the last id, is not predicted)."""
    logits = model(batch["src"], batch["tgt_in"]).float()
    return F.cross_entropy(logits.flatten(0, 1), batch["tgt_out"].flatten(), ignore_index=logits.size(-1) - 1,
                           label_smoothing=label_smoothing)

# -----------------------------------------------------------------------------------------------------
# Downstream: translation by beam search (section 6.1), and BLEU

@torch.no_grad()
def beam_search(model: Transformer, src, beam: int = 4, alpha: float = 0.6, max_extra: int = 50) -> list[list[int]]:
    """Sources (B, S) -> each one's best hypothesis, without <s> and </s> (beam 1: greedy search); the decoder's keys
    and values cached. Of the 2 * beam best extensions, the best `beam` that do not end live on; those among the
    best `beam` that end in </s> finish, scored log P / lp(|Y|) (|Y| counts </s>), until `beam` have; at most input
    length + max_extra tokens come before </s>, which the last step forces (all as fairseq)."""
    lp = lambda length: ((5 + length) / 6) ** alpha  # the length penalty (Wu et al. 2016, eq. 14)
    (memory, src_mask), B, K, dev = model.encode(src), src.size(0), beam, src.device
    steps = (src_mask.sum((1, 2, 3)) + max_extra).clamp(max=model.cfg.max_len)  # (B,): the input counts its </s>
    memory, src_mask, limit = memory.repeat_interleave(K, 0), src_mask.repeat_interleave(K, 0), steps.tolist()
    seqs, cache = torch.full((B * K, 1), model.bos, device=dev), [{"self": {}, "cross": {}} for _ in model.decoder]
    scores = torch.tensor([0.0] + [-math.inf] * (K - 1), device=dev).repeat(B, 1)  # (B, K): one hypothesis at first
    finished = [[] for _ in range(B)]
    for t in range(1, int(steps.max()) + 1):
        logits = (model.decode(seqs[:, -1:], memory, src_mask, cache)[:, -1] @ model.embed.weight.T).float()
        logits[:, [model.bos, model.pad]] = -math.inf  # never generated
        last = (steps == t).repeat_interleave(K)[:, None] & (torch.arange(logits.size(-1), device=dev) != model.eos)
        logp = rearrange(logits.log_softmax(-1).masked_fill(last, -math.inf), "(b k) v -> b k v", k=K)
        top, idx = (scores[:, :, None] + logp).flatten(1).topk(2 * K, dim=-1)  # (B, 2K)
        token, origin = idx % logp.size(-1), idx // logp.size(-1)
        ends = token == model.eos
        for b in (b for b in range(B) if len(finished[b]) < K and t <= limit[b]):
            for j in (ends[b, :K] & top[b, :K].isfinite()).nonzero().flatten().tolist()[:K - len(finished[b])]:
                hyp = seqs[b * K + origin[b, j], 1:].tolist()
                finished[b].append((top[b, j].item() / lp(len(hyp) + 1), hyp))
        keep = (torch.arange(2 * K, device=dev) + 2 * K * ends).topk(K, largest=False).indices  # best K not ending
        scores = top.gather(1, keep).masked_fill(ends.gather(1, keep), -math.inf)
        rows = (torch.arange(B, device=dev)[:, None] * K + origin.gather(1, keep)).flatten()  # (B*K,)
        seqs = torch.cat([seqs[rows], token.gather(1, keep).flatten()[:, None]], dim=1)
        for layer in cache:
            layer["self"]["k"], layer["self"]["v"] = layer["self"]["k"][rows], layer["self"]["v"][rows]
        if all(len(f) >= K or t >= s for f, s in zip(finished, limit)):
            break
    return [max(f, key=lambda h: h[0])[1] if f else [] for f in finished]

def translate_lines(model: Transformer, tok: ByteBPE, lines: list[str], cfg: Config, device, batch: int = 64) -> list:
    """Translate sentences in batches of similar length, with cfg's beam_size, length_penalty and max_extra_len."""
    ids = [tok.encode(s) + [model.eos] for s in lines]
    longest, n = max(((len(x), n) for n, x in enumerate(ids, 1)), default=(0, 0))
    require(longest <= (most := model.cfg.max_len), f"input line {n} has {longest} tokens, more than --max_len {most}")
    order, out, _ = sorted(range(len(ids)), key=lambda i: len(ids[i])), [""] * len(ids), model.eval()
    for chunk in (order[i:i + batch] for i in range(0, len(order), batch)):
        src = nn.utils.rnn.pad_sequence([torch.tensor(ids[j]) for j in chunk], True, model.pad).to(device)  # (B, S)
        for j, hyp in zip(chunk, beam_search(model, src, cfg.beam_size, cfg.length_penalty, cfg.max_extra_len)):
            out[j] = tok.decode(hyp)
    return out

# BLEU as sacreBLEU computes it by default: mteval-v13a tokens, 4-grams, exponential smoothing of zero counts.
TOKENIZE_13A = [(re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "), (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
                (re.compile(r"([\.,])([^0-9])"), r" \1 \2"), (re.compile(r"([0-9])(-)"), r"\1 \2 ")]

def tokenize_13a(line: str) -> list[str]:
    line = line.rstrip().replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        line = line.replace(entity, char)
    return functools.reduce(lambda text, rule: rule[0].sub(rule[1], text), TOKENIZE_13A, f" {line} ").split()

def corpus_bleu(hyps: list[str], refs: list[str]) -> float:
    """Corpus BLEU (Papineni et al. 2002) in 0-100 against one reference per sentence."""
    correct, total, sys_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for h, r in zip(hyps, refs):
        h, r = tokenize_13a(h), tokenize_13a(r)
        sys_len, ref_len = sys_len + len(h), ref_len + len(r)
        for n in range(1, 5):
            h_grams, r_grams = (Counter(tuple(x[i:i + n]) for i in range(len(x) - n + 1)) for x in (h, r))
            correct[n - 1] += sum(min(c, r_grams[g]) for g, c in h_grams.items())
            total[n - 1] += max(0, len(h) - n + 1)
    if not any(correct) or not all(total):
        return 0.0
    log_p, smooth = 0.0, 1.0
    for c, t in zip(correct, total):
        smooth *= 1 if c else 2  # sacreBLEU's "exp" smoothing: 1 / (2^k * total) for the k-th zero count
        log_p += math.log(100.0 * c / t if c else 100.0 / (smooth * t))
    bp = 1.0 if sys_len >= ref_len else math.exp(1 - ref_len / sys_len)
    return bp * math.exp(log_p / 4)

# -----------------------------------------------------------------------------------------------------
# Vocabulary: one byte-level BPE learned over both languages (section 5.1's shared source-target BPE)
SPECIALS = ("<s>", "</s>", "<pad>")  # the last three ids: BOS, EOS, PAD
# GPT-2's pre-tokenizer in `re` (gpt.py explains it)
# Copied from gpt.py: NUMERALS
NUMERALS = "".join(c for c in map(chr, range(sys.maxunicode + 1)) if unicodedata.category(c) in ("Nl", "No"))
# Copied from gpt.py: PRETOKENIZE
PRETOKENIZE = re.compile(rf"'(?:[sdmt]|ll|ve|re)| ?[^\W\d_{NUMERALS}]+| ?[\d{NUMERALS}]+| ?(?:[^\s\w]|[_\x1c-\x1f])+"
                         r"|[^\S\x1c-\x1f]+(?![\S\x1c-\x1f])|[^\S\x1c-\x1f]+")  # merges never cross these pieces

# Copied from gpt.py: ByteBPE
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
# Data: Multi30k (downloaded once and checked), a local parallel corpus, the copy task; batches of tokens

M30K = "https://raw.githubusercontent.com/multi30k/dataset/a3d2e0d26b56f3846f66a952536ffed4e401d05a/data/task1/raw/"
DATASETS = {"multi30k": {f"{name}.gz": (M30K + f"{name}.gz", sha) for name, sha in (  # ../shared/data/URLS.md
    ("train.de", "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6"),
    ("train.en", "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f"),
    ("val.de", "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a"),
    ("val.en", "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28"),
    ("test_2016_flickr.de", "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8"),
    ("test_2016_flickr.en", "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9"))}}

def read_parallel(folder: Path, split: str, src: str, tgt: str) -> dict:
    """{"src", "tgt": lines}: line i of split.src translates line i of split.tgt; a line ends at \\n, the last too."""
    a, b = (read_text(folder / f"{split}.{lang}").removesuffix("\n").split("\n") for lang in (src, tgt))
    require(len(a) == len(b), f"{folder / f'{split}.{src}'} has {len(a)} lines but {folder / f'{split}.{tgt}'} has "
            f"{len(b)}; a parallel corpus needs one translation per line")
    return {"src": a, "tgt": b}

def load_parallel(cfg: Config) -> tuple[str, dict, str]:
    """(name, {"train", "val", "test": {"src", "tgt": lines}}, the test's name): Multi30k, a folder, the copy task."""
    data = cfg.data
    if data == "multi30k" and (root := download("multi30k", "the built-in SYNTHETIC copy task")):
        for gz in (gz for gz in DATASETS["multi30k"] if not (root / gz[:-3]).exists()):  # published gzipped
            (root / f"{gz}.{os.getpid()}").write_bytes(gzip.decompress((root / gz).read_bytes()))
            os.replace(root / f"{gz}.{os.getpid()}", root / gz[:-3])  # unpacked once, atomically
        data = str(root)
    if data in ("multi30k", "builtin"):  # offline, multi30k falls back to it too (the Annotated Transformer's task)
        log0("data: the built-in SYNTHETIC copy task (strings of 8 random digits; the target is the source)")
        rng, sizes = random.Random(cfg.seed), {"train": 4000, "val": 200, "test": 200}
        lines = {s: [" ".join(rng.choice("0123456789") for _ in range(8)) for _ in range(n)] for s, n in sizes.items()}
        return "builtin-copy", {s: {"src": x, "tgt": x} for s, x in lines.items()}, "test"
    folder, layout = Path(data), f"a folder with train.{cfg.src}, train.{cfg.tgt}, val.{cfg.src}, val.{cfg.tgt}"
    require(folder.exists() or os.sep in data or "." in data, f"unknown dataset {data!r}: use multi30k, builtin or "
            f"{layout} (and test.*)")
    require(folder.is_dir() or not read_text(folder), f"--data {data} is a file, not {layout}")  # read_text first
    test = next((t for t in ("test", "test_2016_flickr") if (folder / f"{t}.{cfg.src}").exists()), None)
    test or log0(f"{folder} has no test.{cfg.src}: the test BLEU is measured on the validation split")
    return folder.name, {s: read_parallel(folder, f, cfg.src, cfg.tgt) for s, f in (("train", "train"), ("val", "val"),
                         ("test", test or "val"))}, {"test_2016_flickr": "test2016"}.get(test, test or "val")

def encode_pairs(tok: ByteBPE, split: dict) -> list[dict]:
    """Examples {"src": source ids </s>, "tgt": <s> target ids </s>}."""
    bos, eos = tok.specials["<s>"], tok.specials["</s>"]
    return [{"src": tok.encode(x) + [eos], "tgt": [bos] + tok.encode(y) + [eos]} for x, y in zip(*split.values())]

def collate(pairs: list[dict], pad_id: int) -> dict:
    """Right-padded src (B, S), decoder input tgt_in = <s> y (B, T) and targets tgt_out = y </s> (B, T)."""
    src, tgt = (nn.utils.rnn.pad_sequence([torch.tensor(p[k]) for p in pairs], True, pad_id) for k in ("src", "tgt"))
    return {"src": src, "tgt_in": tgt[:, :-1], "tgt_out": tgt[:, 1:]}

def token_batches(pairs: list[dict], batch_tokens: int, seed: int) -> list[list[int]]:
    """Section 5.1: pairs by length (ties at random), in batches of about batch_tokens tokens, padding included."""
    rng = random.Random(seed)
    order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i]["src"]), len(pairs[i]["tgt"]), rng.random()))
    batches, S, T = [[]], 0, 0
    for i in order:
        S, T = max(S, len(pairs[i]["src"])), max(T, len(pairs[i]["tgt"]))
        if batches[-1] and (len(batches[-1]) + 1) * (S + T) > batch_tokens:
            batches.append([])
            S, T = len(pairs[i]["src"]), len(pairs[i]["tgt"])
        batches[-1].append(i)
    return batches

class TokenBatches:
    """token_batches, in a new seeded order each epoch, each rank its own and as many; `position` counts them."""
    def __init__(self, pairs: list[dict], batch_tokens: int, pad_id: int, seed: int):
        self.pairs, self.pad_id, self.seed, self.position = pairs, pad_id, seed, 0
        self.batches = token_batches(pairs, batch_tokens, seed)
        self.per_epoch = len(self.batches) // WORLD
        require(self.per_epoch, f"{len(self.batches)} batches cannot feed {WORLD} ranks; lower --batch_tokens")

    def __next__(self) -> dict:
        (epoch, index), self.position = divmod(self.position, self.per_epoch), self.position + 1
        order = torch.randperm(len(self.batches), generator=torch.Generator().manual_seed(self.seed + epoch))
        return collate([self.pairs[i] for i in self.batches[order[index * WORLD + RANK]]], self.pad_id)

# -----------------------------------------------------------------------------------------------------
# Stages: train (section 5), test, translate and average (section 6.1)

def noam(warmup: int):
    """Eq. 3 over d_model^-0.5 (the base rate): min(step^-0.5, step * warmup^-1.5), step from 1 (the scheduler's 0)."""
    return lambda s: min((s + 1) ** -0.5, (s + 1) * warmup ** -1.5)

# Copied from gpt.py: adamw
def adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple, eps: float) -> torch.optim.AdamW:
    """Adam with decoupled weight decay on matrices only (none on biases and LayerNorms); fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=params[0].device.type == "cuda")

def load_trained(cfg: Config, ckpt: dict | None = None) -> tuple[Transformer, ByteBPE, Config]:
    """(model, tokenizer, cfg with its architecture) of a checkpoint: a resumed run's, or --init_from's."""
    ckpt = ckpt or load_checkpoint(cfg.init_from)
    cfg = dataclasses.replace(cfg, **{k: ckpt["config"][k] for k in ARCH_FIELDS})
    (model := build_model(cfg)).load_state_dict(ckpt["model"])
    return model, ByteBPE(**ckpt["tokenizer"]), cfg

def scores(m: Transformer, pairs: list[dict], cfg: Config, device) -> dict:
    """The label-smoothed loss, the cross-entropy and the perplexity of the targets of `pairs`."""
    loss = nll = count = 0.0
    for group in token_batches(pairs, cfg.batch_tokens, cfg.seed):
        b = {k: v.to(device) for k, v in collate([pairs[i] for i in group], m.pad).items()}
        logits, targets = m(b["src"], b["tgt_in"]).float().flatten(0, 1), b["tgt_out"].flatten()
        ce = lambda eps: F.cross_entropy(logits, targets, ignore_index=m.pad, reduction="sum", label_smoothing=eps)
        loss, nll, count = loss + ce(cfg.label_smoothing).item(), nll + ce(0.0).item(), count + (targets != m.pad).sum()
    count = float(count)
    return {"loss": loss / count, "nll": nll / count, "ppl": math.exp(min(nll / count, 700))}

def test_bleu(m: Transformer, tok: ByteBPE, split: dict, cfg: Config, step: int, examples: int = 4) -> dict:
    """The test loss and the BLEU of decoding split["src"] with cfg's beam_size (1: greedy), in metrics.jsonl."""
    (device, _, ctx), t0 = setup(cfg), time.time()
    how = f"beam {cfg.beam_size}, alpha {cfg.length_penalty}" if cfg.beam_size > 1 else "greedy"
    with torch.no_grad(), ctx:
        record = {"step": step, "split": "test", **scores(m.to(device).eval(), encode_pairs(tok, split), cfg, device)}
        hyps = translate_lines(m, tok, split["src"], cfg, device)
    record.update(bleu=corpus_bleu(hyps, split["tgt"]), beam=cfg.beam_size, seconds=time.time() - t0)
    log_metrics(cfg.out_dir, f"test BLEU {record['bleu']:.2f} ({how}, sacreBLEU 13a), loss {record['loss']:.4g}, "
                f"{record['seconds']:.0f} s\n", **record)
    for s, r, h in list(zip(split["src"], split["tgt"], hyps))[:examples]:
        log0(f"source     {s}\nreference  {r}\ntranslated {h}\n")
    return record

def train(cfg: Config, test: bool = True) -> dict:
    """the model on --data (sections 5.1-5.4), then the test BLEU of beam search (section 6.1)"""
    ckpt = open_run(cfg, "train", ARCH_FIELDS + ("data", "src", "tgt", "bpe_vocab_size"))
    (device, _, _), out, (name, splits, _) = setup(cfg), Path(cfg.out_dir), load_parallel(cfg)
    model, tok, cfg = load_trained(cfg, ckpt) if ckpt or cfg.init_from else (None, None, cfg)
    if model is None:  # one BPE learned over both languages (section 5.1)
        tok = ByteBPE.train("\n".join(splits["train"]["src"] + splits["train"]["tgt"]), cfg.bpe_vocab_size, SPECIALS)
        log0(f"a byte-level BPE shared by {cfg.src} and {cfg.tgt}: {len(tok)} tokens")
        require(cfg.vocab_size in (0, len(tok)), f"--vocab_size {cfg.vocab_size} is not the vocabulary's {len(tok)}")
        model = build_model(cfg := dataclasses.replace(cfg, vocab_size=len(tok)))
    pairs = {s: encode_pairs(tok, split) for s, split in splits.items()}
    longest, split, n = max((max(len(p["src"]), len(p["tgt"]) - 1), s, n)  # the decoder reads <s> y, predicts y </s>
                            for s, ps in pairs.items() for n, p in enumerate(ps, 1))
    require(longest <= cfg.max_len, f"{name} {split} line {n} has {longest} tokens, more than --max_len {cfg.max_len}"
            f"; pass --max_len {-(-longest // 64) * 64} (or more)")
    batches, model = TokenBatches(pairs["train"], cfg.batch_tokens, model.pad, cfg.seed), model.to(device)
    src_len, tgt_len = (sum(len(p[k]) for p in pairs["train"]) / len(pairs["train"]) for k in ("src", "tgt"))
    log0(f"{name} {cfg.src}->{cfg.tgt}: {len(pairs['train']):,} training pairs in {len(batches.batches)} batches, "
         f"{len(pairs['val']):,} validation pairs; {sum(p.numel() for p in model.parameters()):,} parameters")
    def evaluate(m):  # on val; and a copy of the weights for `average` (atomic, only finite ones, rank 0)
        metrics, step = scores(m, pairs["val"], cfg, device), batches.position // cfg.grad_accum
        if RANK == 0 and cfg.keep_checkpoints and all(p.isfinite().all() for p in m.parameters()):
            save_checkpoint(out / f"ckpt_{step:07d}.pt", {"script": SCRIPT, "stage": "train", "step": step, "config":
                            dataclasses.asdict(cfg), "model": m.state_dict(), "tokenizer": tok.state()})
            [old.unlink() for old in sorted(out.glob("ckpt_*.pt"))[:-cfg.keep_checkpoints]]  # the older ones
        return metrics
    opt = adamw(model, cfg.lr_factor * cfg.d_model ** -0.5, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.adam_eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, noam(cfg.warmup_steps))
    loss = functools.partial(pretrain_loss, label_smoothing=cfg.label_smoothing)
    metrics = train_loop(cfg, "train", model, opt, sched, batches, loss, evaluate, ckpt, total=cfg.total_steps,
                         tokens=cfg.batch_tokens * cfg.grad_accum, flops=model.flops_per_token(src_len, tgt_len - 1),
                         extra={"tokenizer": tok.state()})
    if RANK == 0 and test:  # the test BLEU of beam search (section 6.1), also in metrics.jsonl
        record = test_bleu(model, tok, splits["test"], cfg, metrics["step"])
        metrics.update(bleu=record["bleu"], test_loss=record["loss"])
    return metrics

def test(cfg: Config) -> dict:
    """the test BLEU of the --init_from model on --data's test split, with --beam_size (1: greedy search)"""
    require(cfg.init_from, "test needs --init_from a checkpoint (out_dir/ckpt.pt, or one that average wrote)")
    ckpt, (name, splits, test_name) = load_checkpoint(cfg.init_from), load_parallel(cfg)
    (model, tok, cfg), _ = load_trained(cfg, ckpt), Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    return {"task": f"{name} {test_name}", **test_bleu(model, tok, splits["test"], cfg, ckpt["step"], examples=0)}

def translate(cfg: Config) -> list[str]:
    """the sentences on standard input, one per line, with the --init_from model (section 6.1)"""
    require(cfg.init_from, "translate needs --init_from a checkpoint (out_dir/ckpt.pt, or one that average wrote)")
    (model, tok, cfg), (device, _, ctx) = load_trained(cfg), setup(cfg)
    try:
        text = sys.stdin.read().replace("\r\n", "\n")
    except UnicodeDecodeError:
        raise UserError("standard input is not UTF-8 text") from None
    lines = text.removesuffix("\n").split("\n") if text else []  # at \n only: a sentence may hold U+2028 or NEL
    with ctx:
        out = translate_lines(model.to(device), tok, lines, cfg, device)
    out and print(*out, sep="\n", flush=True)
    return out

def average(cfg: Config) -> dict:
    """the mean of the weights of --init_from's last --average_last kept copies, or of a,b,c.pt (section 6.1)"""
    require(cfg.init_from, "average needs --init_from: a training out_dir, or checkpoints a.pt,b.pt,c.pt")
    folder = Path(cfg.init_from)
    paths = sorted(folder.glob("ckpt_*.pt"))[-cfg.average_last:] if folder.is_dir() else [
        Path(p) for p in cfg.init_from.split(",") if p]
    require(paths, f"{folder} holds no kept copies ckpt_STEP.pt (train with --keep_checkpoints above 0)")
    ckpts = [load_checkpoint(p, ("train", "average")) for p in paths]
    for p, c in zip(paths[1:], ckpts[1:]):
        require(all(c["config"][k] == ckpts[0]["config"][k] for k in ARCH_FIELDS) and c["tokenizer"] == ckpts[0][
            "tokenizer"], f"{p} is another model than {paths[0]} (architecture or vocabulary); average one run's")
    out = Path(cfg.out_dir) / "ckpt.pt"
    require(not out.exists() or load_checkpoint(out)["stage"] == "average", f"{out} is a training checkpoint; write "
            "the average elsewhere with --out_dir")
    model = {k: sum(c["model"][k].double() for c in ckpts).div(len(ckpts)).to(v.dtype)
             for k, v in ckpts[0]["model"].items()}
    save_checkpoint(out, {"script": SCRIPT, "stage": "average", "step": max(c["step"] for c in ckpts), "model": model,
                          "config": ckpts[0]["config"], "tokenizer": ckpts[0]["tokenizer"],
                          "averaged": [str(p) for p in paths]})
    log0(f"averaged {len(paths)} checkpoints ({', '.join(p.name for p in paths)}) into {out}")
    return {"path": str(out), "averaged": [str(p) for p in paths]}

def main_job(cfg: Config) -> dict:
    """train into out_dir/train, average its kept copies (--keep_checkpoints, section 6.1) into out_dir/average, then
    the test BLEU of beam search against greedy decoding into out_dir/test: the claim"""
    out, last = Path(cfg.out_dir), min(cfg.average_last, cfg.keep_checkpoints)
    at = lambda stage, **kw: dataclasses.replace(cfg, out_dir=str(out / stage), **kw)  # each stage in its folder
    metrics, final = train(at("train"), test=False), out / "train" / "ckpt.pt"
    if RANK:  # rank 0 decodes
        return metrics
    final = average(at("average", init_from=str(out / "train"), average_last=last))["path"] if last > 1 else final
    beam, greedy = (test(at("test", init_from=str(final), beam_size=k)) for k in (cfg.beam_size, 1))
    task, w, wo = beam["task"], beam["bleu"], greedy["bleu"]
    differs = f"beam search of {beam['beam']} vs greedy decoding"
    log_metrics(out, f"claim: {task} BLEU {w:.1f} vs {wo:.1f} ({differs})", split="claim", task=task, metric="BLEU",
                **{"with": w, "without": wo}, differs=differs)
    return {**metrics, "bleu": w, "greedy": wo, "claim": {"with": w, "without": wo, "task": task, "differs": differs}}

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
    return run_main(argv, {None: main_job, "train": train, "average": average, "test": test, "translate": translate})

if __name__ == "__main__":
    main()
