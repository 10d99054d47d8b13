"""BERT: pre-training of deep bidirectional Transformers (masked LM + next sentence), then fine-tuning.

Paper: Jacob Devlin, Ming-Wei Chang, Kenton Lee, Kristina Toutanova, "BERT: Pre-training of Deep Bidirectional
Transformers for Language Understanding", 2018, arXiv:1810.04805. The official code is google-research/bert.

What this file reproduces
  - Section 3: token + learned position + segment embeddings; post-LN encoder layers, exact (erf) GELU, LayerNorm eps
    1e-12, dropout 0.1, truncated-normal init (std 0.02); the pooler (tanh on [CLS]); the masked-LM head (dense, GELU,
    LayerNorm, the decoder tied to the token embedding plus a bias); the NSP head. Google's WordPiece tokenizer.
  - Section 3.1 data as create_pretraining_data.py makes it: `[CLS] A [SEP] B [SEP]` cut from documents of sentences
    (shorter at short_seq_prob), B from another document in 50% of the draws; exactly min(max_predictions_per_seq,
    max(1, round(0.15 n))) of the n tokens masked, 80% [MASK], 10% random, 10% kept; dupe_factor static copies
    shuffled together. NotNext is 52-56% of the pairs (53% on WikiText-2), not 50%, as in Google's data: a chunk of
    one segment is always NotNext, and a NotNext draw puts A's unused segments back, where they make more pairs.
  - Appendix A.2: loss MLM + NSP; Adam (lr 1e-4, betas 0.9 and 0.999, eps 1e-6), weight decay 0.01 except on
    LayerNorms and biases, 10k warmup steps, linear decay, clipping at 1; the last 10% of the steps at length 512
    (--two_phase). Section 4.1: classification from the pooled [CLS] output; lr 2e-5, batch 32, 3 epochs.

Run it (`--help` lists every field by stage: `pretrain` reads the plain ones, `finetune` the finetune_* ones)
  python bert.py   # main job: pretrain, fine-tune on SST-2 from it and (the baseline) from random init: a claim
  python bert.py pretrain --data wikitext2 --out_dir out/wt2   # or sst2, builtin, a text file or folder
  python bert.py finetune --init_from out/wt2/ckpt.pt --finetune_data sst2 --out_dir out/sst2   # or hf:DIR
  torchrun --nproc_per_node=2 bert.py ...          # data parallel (any stage, or the main job)

Deliberate deviations from the paper and the official code
  - WordPiece is learned with BPE's merges (Hugging Face's WordPieceTrainer; Google's is unreleased): [PAD] [UNK] [CLS]
    [SEP] [MASK] are ids 0-4 (a loaded vocab.txt keeps its ids). Words over 100 characters are [UNK] (Google: 200).
  - NotNext's B comes from a uniformly drawn other document (Google's 10 tries can end on A's own); padded keys get
    -inf, not -10000; AdamW has bias correction, and its linear decay starts after warmup (Google's at 0).
  - Left out: dynamic masking (RoBERTa's), the tanh GELU of Google's 2019 code (a gelu_new folder is refused) and
    whole-word masking (Google's 2019 addition). BooksCorpus and Wikipedia are not redistributable: WikiText-2 and
    SST-2, offline the Python docs and a synthetic task. `small` (the main job) pretrains a 4-layer model for minutes
    on the text closest to the task, SST-2's training sentences (labels unused; NSP between them, shuffled phrases,
    is noise), 40% masked, no dropout, then fine-tunes both arms on the same 1,000 SST-2 labels; `tiny` is for tests.
"""

from __future__ import annotations

import argparse, atexit, contextlib, dataclasses, functools, hashlib, heapq, importlib.util, inspect, json, math, os
import random, re, signal, sys, threading, time, typing, unicodedata, urllib.request
from collections import Counter, defaultdict
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
    # model (section 3: BERT-Base, L=12, H=768, A=12, feed-forward 4H; the released uncased vocabulary 30,522)
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_ff: int = 3072
    max_position: int = 512  # learned position embeddings: the longest input
    type_vocab_size: int = 2  # segments A and B
    vocab_size: int = 30522  # embedding rows; 0: the tokenizer's size
    dropout: float = 0.1  # embeddings, attention probabilities, residual branches, the classifier (appendix A.2)
    # pretraining data and tokenizer (section 3.1; create_pretraining_data.py's flags)
    data: str = "wikitext2"  # wikitext2, sst2 (its training sentences), builtin, a text file or folder
    lower_case: bool = True  # uncased: lower-case and strip accents (say --no-lower_case for a cased hf:DIR)
    wordpiece_vocab_size: int = 30522  # the 5 special tokens, the text's characters, then merges
    max_seq_length: int = 128
    max_predictions_per_seq: int = 20  # at max_seq_length; scaled with the length in phase two
    masked_lm_prob: float = 0.15
    short_seq_prob: float = 0.1
    dupe_factor: int = 10  # static masking: copies of the data, each with its own pairs and masks
    two_phase: bool = True  # appendix A.2: the last 10% of the steps at length max_position
    # pretrain (appendix A.2: batch 256, 1M steps, Adam lr 1e-4, 10k warmup steps, linear decay)
    batch_size: int = 256
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4
    warmup_steps: int = 10_000
    total_steps: int = 1_000_000  # the schedule's length
    weight_decay: float = 0.01  # decoupled; none on LayerNorms and biases (Adam's betas 0.9, 0.999, eps 1e-6)
    grad_clip: float = 1.0
    # finetune (section 4.1, appendix A.3; run_classifier.py)
    finetune_data: str = "sst2"  # sst2, builtin, or a folder with train.tsv and dev.tsv
    finetune_lr: float = 2e-5  # the paper picks from 5e-5, 3e-5, 2e-5
    finetune_batch_size: int = 32
    finetune_epochs: int = 3
    finetune_warmup: float = 0.1  # the fraction of the fine-tuning steps
    finetune_examples: int = 0  # a subset of the training examples drawn with --seed, the same in both arms (0: all)
    finetune_random_init: bool = False  # the baseline: init_from's vocabulary and architecture, untrained weights
    # run control
    out_dir: str = "out/bert"
    init_from: str = ""  # a bert.py checkpoint, or hf:DIR with Hugging Face BertForPreTraining weights and vocab.txt
    resume: bool = False  # continue the run in out_dir exactly
    max_steps: int = 0  # stop this run at this step (0: run the whole schedule)
    eval_interval: int = 10_000
    eval_batches: int = 20  # validation batches per evaluation, spread over the split (0: all)
    log_interval: int = 100
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # autocast; master weights stay fp32
    compile: bool = False  # torch.compile the model
    seed: int = 1337

PRESETS = {
    "paper": Config(),
    "small": Config(n_layer=4, n_head=4, d_model=128, d_ff=512, vocab_size=0, dropout=0.0, data="sst2",
                    wordpiece_vocab_size=4000, max_seq_length=64, max_predictions_per_seq=26, masked_lm_prob=0.4,
                    dupe_factor=10, two_phase=False, batch_size=32, lr=2e-3, warmup_steps=100, total_steps=3000,
                    finetune_lr=1e-3, finetune_epochs=5, finetune_examples=1000, eval_interval=1000, log_interval=100),
    "tiny": Config(n_layer=2, n_head=2, d_model=32, d_ff=64, max_position=128, vocab_size=0, wordpiece_vocab_size=300,
                   max_seq_length=64, dupe_factor=2, two_phase=False, batch_size=8, lr=1e-3, warmup_steps=2,
                   total_steps=20, eval_batches=2, log_interval=5, finetune_lr=1e-3, finetune_epochs=1),
}
ARCH_FIELDS = ("n_layer", "n_head", "d_model", "d_ff", "max_position", "type_vocab_size", "vocab_size")

def validate(cfg: Config) -> None:
    for name in ("n_layer", "n_head", "d_model", "d_ff", "max_position", "type_vocab_size", "wordpiece_vocab_size",
                 "max_predictions_per_seq", "dupe_factor", "batch_size", "grad_accum", "total_steps", "lr",
                 "finetune_lr", "finetune_batch_size", "finetune_epochs", "eval_interval", "log_interval"):
        require(getattr(cfg, name) > 0, f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("vocab_size", "warmup_steps", "max_steps", "eval_batches", "weight_decay", "grad_clip"):
        require(getattr(cfg, name) >= 0, f"--{name} must not be negative, got {getattr(cfg, name)}")
    require(cfg.d_model % cfg.n_head == 0, f"--n_head {cfg.n_head} must divide --d_model {cfg.d_model}")
    require(0 <= cfg.dropout < 1 and 0 < cfg.masked_lm_prob < 1 and 0 <= cfg.short_seq_prob <= 1 and 0 <=
            cfg.finetune_warmup <= 1, "--dropout must be in [0, 1), --masked_lm_prob in (0, 1), --short_seq_prob "
            "and --finetune_warmup in [0, 1]")
    require(5 <= cfg.max_seq_length <= cfg.max_position, f"--max_seq_length {cfg.max_seq_length} must be at least 5 "
            f"([CLS] A [SEP] B [SEP]) and at most the model's context, --max_position {cfg.max_position}")

# -----------------------------------------------------------------------------------------------------
# Model (section 3; modeling.py)

class Layer(nn.Module):
    """Post-LN encoder layer: h = LN(x + Drop(MultiHead(x))); out = LN(h + Drop(W2 GELU(W1 h))), the exact (erf) GELU.
    MultiHead: softmax(Q K^T / sqrt(d)) V in each head, no weight on padded keys, dropout on the probabilities."""
    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head, self.dropout, self.drop = cfg.n_head, cfg.dropout, nn.Dropout(cfg.dropout)
        self.qkv, self.proj = nn.Linear(cfg.d_model, 3 * cfg.d_model), nn.Linear(cfg.d_model, cfg.d_model)
        self.fc1, self.fc2 = nn.Linear(cfg.d_model, cfg.d_ff), nn.Linear(cfg.d_ff, cfg.d_model)
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.d_model, eps=1e-12), nn.LayerNorm(cfg.d_model, eps=1e-12)
    def forward(self, x, keep):  # x (B, T, C); keep (B, T): True at real tokens
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_head)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=rearrange(keep, "b s -> b 1 1 s"),
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, d)
        h = self.ln_1(x + self.drop(self.proj(rearrange(a, "b h t d -> b t (h d)"))))  # (B, T, C)
        return self.ln_2(h + self.drop(self.fc2(F.gelu(self.fc1(h)))))

class Bert(nn.Module):
    """The encoder: the three embeddings summed and normalised, the layers, and the pooler (dense + tanh on [CLS])."""
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg, self.drop = cfg, nn.Dropout(cfg.dropout)
        self.tok, self.pos = nn.Embedding(cfg.vocab_size, cfg.d_model), nn.Embedding(cfg.max_position, cfg.d_model)
        self.seg, self.ln = nn.Embedding(cfg.type_vocab_size, cfg.d_model), nn.LayerNorm(cfg.d_model, eps=1e-12)
        self.layers, self.pooler = nn.ModuleList(Layer(cfg) for _ in range(cfg.n_layer)), nn.Linear(*[cfg.d_model] * 2)
    def forward(self, ids, segments, keep):
        """ids, segments (B, T), keep (B, T) True at real tokens -> hidden states (B, T, C), pooled [CLS] (B, C)."""
        require(ids.size(1) <= self.cfg.max_position, f"a sequence of {ids.size(1)} tokens is longer than the "
                f"model's {self.cfg.max_position} positions; use a shorter --max_seq_length")
        positions = torch.arange(ids.size(1), device=ids.device)
        x = self.drop(self.ln(self.tok(ids) + self.pos(positions) + self.seg(segments)))  # (B, T, C)
        for layer in self.layers:
            x = layer(x, keep)
        return x, torch.tanh(self.pooler(x[:, 0]))

class BertForPreTraining(nn.Module):
    """The encoder, the masked-LM head (its decoder tied to the token embedding) and the NSP head; Google's init."""
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg, self.bert = cfg, Bert(cfg)
        self.mlm_dense, self.mlm_ln = nn.Linear(cfg.d_model, cfg.d_model), nn.LayerNorm(cfg.d_model, eps=1e-12)
        self.mlm_bias, self.nsp = nn.Parameter(torch.zeros(cfg.vocab_size)), nn.Linear(cfg.d_model, 2)
        for name, p in self.named_parameters():  # matrices: N(0, 0.02) cut at 2 sigma; biases 0; LayerNorm gains 1
            if p.dim() == 2 or name.endswith("bias"):
                nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04) if p.dim() == 2 else nn.init.zeros_(p)
    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """MLM logits (N, V) at the N masked positions (where mlm_labels is not -100), NSP logits (B, 2)."""
        h, pooled = self.bert(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        z = self.mlm_ln(F.gelu(self.mlm_dense(h[batch["mlm_labels"] != -100])))  # the transform (N, C)
        return z @ self.bert.tok.weight.T + self.mlm_bias, self.nsp(pooled)

build_model = BertForPreTraining

def flops_per_token(c: Config, seq_len: int, masked: float = 0.0) -> float:
    """Training FLOPs: 6N for the weights that multiply (the MLM head's at masked positions) + 12 L T C (attention)."""
    n = c.n_layer * (4 * c.d_model + 2 * c.d_ff) + c.d_model + masked * (c.d_model + c.vocab_size)
    return 6 * n * c.d_model + 12 * c.n_layer * seq_len * c.d_model

# -----------------------------------------------------------------------------------------------------
# Objective: masked-LM cross-entropy at the masked positions + NSP cross-entropy, in fp32 under autocast

def pretrain_loss(model, batch: dict) -> torch.Tensor:
    (mlm_logits, nsp_logits), targets = model(batch), batch["mlm_labels"][batch["mlm_labels"] != -100]
    return F.cross_entropy(mlm_logits.float(), targets) + F.cross_entropy(nsp_logits.float(), batch["nsp_labels"])

# -----------------------------------------------------------------------------------------------------
# Downstream: sentence (pair) classification from the pooled [CLS] output (section 4.1)

class BertClassifier(nn.Module):
    """The pooled [CLS] output -> dropout -> linear (initialised as the model's); every weight is fine-tuned."""
    def __init__(self, bert: Bert, n_classes: int, dropout: float):
        super().__init__()
        self.bert, self.drop, self.head = bert, nn.Dropout(dropout), nn.Linear(bert.cfg.d_model, n_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.02, a=-0.04, b=0.04)
        nn.init.zeros_(self.head.bias)
    def forward(self, batch: dict) -> torch.Tensor:  # logits (B, n_classes)
        return self.head(self.drop(self.bert(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])[1]))

# -----------------------------------------------------------------------------------------------------
# Tokenizer: Google's basic tokenisation, then WordPiece (tokenization.py)

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0-4 in a trained vocabulary
MAX_WORD_CHARS = 100  # a longer word is [UNK] (Hugging Face's limit; Google's is 200)
SPECIAL_SPLIT = re.compile("(" + "|".join(map(re.escape, SPECIALS)) + ")")  # matched in text first, as Hugging Face
DROPPED = re.compile("[\ufffd" + re.escape("".join(c for c in map(chr, range(sys.maxunicode + 1)) if c not in "\t\n\r"
                                                 and unicodedata.category(c) in ("Cc", "Cf"))) + "]")  # \t\n\r: spaces
PUNCTUATION = re.compile("([" + re.escape("".join(c for c in map(chr, range(sys.maxunicode + 1)) if 32 < ord(c) < 127
                                                  and not c.isalnum() or unicodedata.category(c)[0] == "P")) + "])")
CJK = re.compile("[\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002ceaf\U0002f800-"
                 "\U0002fa1f]")

def basic_tokenize(text: str, lower: bool) -> list[str]:
    """Google's BasicTokenizer: drop \\0, U+FFFD, control and format characters (Cc, Cf), space CJK characters; split
    at whitespace; uncased, lower-case each whole word (so final sigma) and strip accents; split off punctuation."""
    words = []
    for word in CJK.sub(r" \g<0> ", DROPPED.sub("", text)).split():
        if lower:  # the whole word, then without its accents (nonspacing marks after NFD)
            word = word.lower() if word.isascii() else "".join(
                c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
        words += [piece for piece in PUNCTUATION.split(word) if piece]
    return words

class WordPiece:
    """Google's: greedy longest-match-first pieces of each basic token, `##` inside a word; no match: [UNK]."""
    def __init__(self, vocab: list[str], lower: bool = True):
        self.vocab, self.lower, self.ids, self.cache = list(vocab), lower, {t: i for i, t in enumerate(vocab)}, {}
        require(all(s in self.ids for s in SPECIALS), f"the vocabulary lacks some of {', '.join(SPECIALS)}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (self.ids[s] for s in SPECIALS)
    @classmethod
    def train(cls, texts, vocab_size: int, lower: bool = True) -> "WordPiece":
        """BPE's merges as WordPiece (Hugging Face's WordPieceTrainer): `w ##o ##r ##d`, then the most frequent pair
        (a, ##b) becomes `ab`; pairs counted over word types, updated per merge, a heap: WikiText-2 in seconds."""
        words = Counter(w for text in texts for chunk in SPECIAL_SPLIT.split(text)[::2]
                        for w in basic_tokenize(chunk, lower) if len(w) <= MAX_WORD_CHARS)
        vocab = list(SPECIALS) + sorted({w[0] for w in words} | {"##" + c for w in words for c in w[1:]})
        require(vocab_size >= len(vocab), f"--wordpiece_vocab_size {vocab_size} is below the {len(vocab)} that the "
                f"5 special tokens and the {len(vocab) - 5} characters of the text (initial and ##) need")
        id_of, pair_count, where = {t: i for i, t in enumerate(vocab)}, Counter(), defaultdict(set)
        seqs, freqs = [[id_of[w[0]]] + [id_of["##" + c] for c in w[1:]] for w in words], list(words.values())
        def count(i: int, sign: int, new: int = -1):  # add (or take out) word i's pairs; only pairs holding the
            for p in zip(seqs[i], seqs[i][1:]):         # new piece can grow: the heap gets their counts
                pair_count[p] += sign * freqs[i]
                where[p].add(i)
                if new in p:
                    heapq.heappush(heap, (-pair_count[p], p))
        for i in range(len(seqs)):
            count(i, 1)
        heap = sorted((-c, p) for p, c in pair_count.items())  # a sorted list is a heap
        while len(vocab) < vocab_size and heap:
            neg, pair = heapq.heappop(heap)
            if pair_count[pair] != -neg:  # stale: the count fell after the push; back in with the true one
                if pair_count[pair] > 0:
                    heapq.heappush(heap, (-pair_count[pair], pair))
                continue
            merged = vocab[pair[0]] + vocab[pair[1]][2:]  # (a, ##b) -> ab; (##a, ##b) -> ##ab
            if merged not in id_of:  # two pairs can spell one piece
                id_of[merged] = len(vocab)
                vocab.append(merged)
            for i in where.pop(pair):
                count(i, -1)
                s, j, seqs[i] = seqs[i], 0, []
                while j < len(s):
                    hit = j + 1 < len(s) and (s[j], s[j + 1]) == pair
                    seqs[i].append(id_of[merged] if hit else s[j])
                    j += 2 if hit else 1
                count(i, 1, id_of[merged])
        return cls(vocab, lower)
    def encode_word(self, word: str) -> list[int]:
        if word not in self.cache:
            ids, start = [], 0
            while start < len(word) <= MAX_WORD_CHARS:  # the longest piece in the vocabulary at each start
                prefix = "##" if start else ""
                end = next((e for e in range(len(word), start, -1) if prefix + word[start:e] in self.ids), None)
                if end is None:
                    break  # no piece fits: the whole word is unknown
                ids, start = ids + [self.ids[prefix + word[start:end]]], end
            self.cache[word] = ids if start == len(word) else [self.unk_id]
        return self.cache[word]
    def encode(self, text: str) -> list[int]:
        return [i for n, chunk in enumerate(SPECIAL_SPLIT.split(text)) for i in ([self.ids[chunk]] if n % 2 else [
            j for word in basic_tokenize(chunk, self.lower) for j in self.encode_word(word)])]  # odd: special tokens

# -----------------------------------------------------------------------------------------------------
# Data: documents of sentences, pretraining instances, batches; labelled sentences for fine-tuning

DATASETS = {  # name -> {file in the cache: (pinned URL, sha256)}; ../shared/data/URLS.md lists them all
    "wikitext2": {f"{s}.txt": ("https://raw.githubusercontent.com/pytorch/examples/77f55b912142e11fcfdf5b530231fb9c"
                               f"52f181e8/word_language_model/data/wikitext-2/{s}.txt", h) for s, h in (
        ("train", "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f"),
        ("valid", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"))},
    "sst2": {f"{s}.tsv": ("https://raw.githubusercontent.com/eyalbd2/Reproducing-AutoPrompt/6288fb5bec9c572f2492875ae0"
                          f"111df5b6daed11/glue_data/SST-2/{f}.tsv", h) for s, f, h in (  # train_full: all of it
        ("train", "train_full", "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1"),
        ("dev", "dev", "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0"))}}
WIKI_HEADING = re.compile(r" = [^=].* = ")  # ` = Title = ` starts an article; ` = = Section = = ` does not
WIKI_MARKUP = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), ("<unk>", "[UNK]"))

def documents(text: str) -> list[list[str]]:
    """Documents of sentences: WikiText's articles (split after spaced . ! ?), else a sentence a line, blank between."""
    docs, wiki = [[]], any(WIKI_HEADING.fullmatch(line) for line in text.split("\n")[:5])
    for line in text.split("\n"):
        if WIKI_HEADING.fullmatch(line) if wiki else not line.strip():  # a new document
            docs.append([])
        elif not wiki:
            docs[-1].append(line.strip())
        elif line.strip() and not line.startswith(" = "):
            line = functools.reduce(lambda text, markup: text.replace(*markup), WIKI_MARKUP, line)
            docs[-1] += [s.strip() for s in re.split(r"(?<= [.!?]) ", line) if s.strip()]
    return [d for d in docs[wiki:] if d]  # in WikiText, what precedes the first article is not one

def load_documents(data: str) -> tuple[str, list, list]:
    """(name, train, validation documents): a named dataset's or a folder's train.txt and valid.txt, the training
    sentences of sst2 (or a folder's train.tsv) 8 a document, the last 1% held out, the last 10% of the documents of a
    file (a folder's files), or builtin (offline): the Python documentation's topics, 8 held out."""
    if data in DATASETS:
        data = str(download(data, "the built-in corpus (Python documentation)") or "builtin")
    if data == "builtin":
        docs = [re.split(r"(?<=[.!?])\s+", " ".join(t.split())) for _, t in  # sentences end at . ! ?
                sorted(importlib.import_module("pydoc_data.topics").topics.items())]
        return "builtin", docs[:-8], docs[-8:]
    path = Path(data)
    require(path.exists() or os.sep in data or "." in data, f"unknown dataset {data!r}: use one of "
            f"{', '.join(DATASETS)}, builtin, or a path to a text file or folder")
    if (path / "train.tsv").is_file():  # classification data: its training sentences (labels dropped), 8 a document
        docs = (lambda t: [t[i:i + 8] for i in range(0, len(t), 8)])([text for _, text in read_tsv(path / "train.tsv")])
        return path.name, docs[:-max(2, len(docs) // 100)], docs[-max(2, len(docs) // 100):]
    if (path / "train.txt").is_file() and (path / "valid.txt").is_file():
        return path.name, documents(read_text(path / "train.txt")), documents(read_text(path / "valid.txt"))
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name[0] != ".") if path.is_dir() else [path]
    docs = [d for p in files or [path / "train.txt"] for d in documents(read_text(p))]
    return path.name, docs[:-max(2, len(docs) // 10)], docs[-max(2, len(docs) // 10):]

def mask_tokens(ids: list[int], tok: WordPiece, rng: random.Random, masked_lm_prob: float,
                max_predictions: int) -> tuple[list[int], list[int], list[int]]:
    """create_masked_lm_predictions: (masked ids, positions, original ids there), exactly min(max_predictions,
    max(1, round(masked_lm_prob * len(ids)))) positions, not [CLS]/[SEP]/[PAD]: [MASK] 80%, random 10%, kept 10%."""
    candidates = [i for i, t in enumerate(ids) if t not in (tok.cls_id, tok.sep_id, tok.pad_id)]
    rng.shuffle(candidates)
    chosen, out = sorted(candidates[:min(max_predictions, max(1, round(len(ids) * masked_lm_prob)))]), list(ids)
    for i, r in ((i, rng.random()) for i in chosen):  # r < 0.8: [MASK]; r < 0.9: any token, as Google's; else kept
        out[i] = tok.mask_id if r < 0.8 else rng.randrange(len(tok.vocab)) if r < 0.9 else out[i]
    return out, chosen, [ids[i] for i in chosen]

def create_instances(docs: list, tok: WordPiece, cfg: Config, seq_len: int, rng: random.Random) -> list[dict]:
    """create_instances_from_document and masking: dicts of ids, n_a (A's length), is_random_next, positions, labels."""
    instances, max_tokens = [], seq_len - 3  # room for [CLS] A [SEP] B [SEP]
    max_predictions = round(cfg.max_predictions_per_seq * seq_len / cfg.max_seq_length)  # 20 at 128: 80 at 512
    for d, doc in enumerate(docs):
        target = rng.randint(2, max_tokens) if rng.random() < cfg.short_seq_prob else max_tokens
        chunk, i = [], 0
        while i < len(doc):
            chunk.append(doc[i])
            if i == len(doc) - 1 or sum(map(len, chunk)) >= target:
                a_end = rng.randint(1, len(chunk) - 1) if len(chunk) >= 2 else 1
                a, b = [t for s in chunk[:a_end] for t in s], [t for s in chunk[a_end:] for t in s]
                is_random = len(chunk) == 1 or rng.random() < 0.5
                if is_random:  # NotNext: B from another document, and A's unused segments go back
                    other, b, i = docs[(d + 1 + rng.randrange(len(docs) - 1)) % len(docs)], [], i - (len(chunk) - a_end)
                    for s in other[rng.randrange(len(other)):]:
                        b += s
                        if len(b) >= target - len(a):
                            break
                while len(a) + len(b) > max_tokens:  # truncate the longer side, at its front or back at random
                    longer = a if len(a) > len(b) else b
                    del longer[0 if rng.random() < 0.5 else -1]
                ids, positions, labels = mask_tokens([tok.cls_id, *a, tok.sep_id, *b, tok.sep_id], tok, rng,
                                                     cfg.masked_lm_prob, max_predictions)
                instances.append({"ids": ids, "n_a": len(a), "is_random_next": is_random, "positions": positions,
                                  "labels": labels})
                chunk = []
            i += 1
    return instances

def collate(examples: list[dict]) -> dict:
    """Right-padded input_ids (0, as Google's), token_type_ids, attention_mask (B, T); labels (B,) of examples, or
    mlm_labels (B, T) (-100: not predicted) and nsp_labels (B,) (1: NotNext) of pretraining instances."""
    B, T, pretraining = len(examples), max(len(e["ids"]) for e in examples), "positions" in examples[0]
    batch = {"input_ids": torch.zeros(B, T, dtype=torch.long), "token_type_ids": torch.zeros(B, T, dtype=torch.long),
             "attention_mask": torch.zeros(B, T, dtype=torch.bool)}
    batch |= {"mlm_labels": torch.full((B, T), -100), "nsp_labels": torch.tensor([int(e["is_random_next"]) for e in
              examples])} if pretraining else {"labels": torch.tensor([e["label"] for e in examples])}
    for r, e in enumerate(examples):
        batch["input_ids"][r, :len(e["ids"])], batch["attention_mask"][r, :len(e["ids"])] = torch.tensor(e["ids"]), True
        batch["token_type_ids"][r, e["n_a"] + 2:len(e["ids"])] = 1  # B and the last [SEP]; none without a B
        if pretraining:
            batch["mlm_labels"][r, e["positions"]] = torch.tensor(e["labels"], dtype=torch.long)
    return batch

class PretrainingSampler:
    """EpochSampler's batches of all dupe_factor copies (each its own pairs and masks) shuffled together, as Google's
    one file; with two phases, from 90% of the steps, of length max_position. `position` counts the batches."""
    def __init__(self, docs: list, tok: WordPiece, cfg: Config):
        self.docs, self.tok, self.cfg, self.phase, self.position = docs, tok, cfg, (None, None), 0
        self.switch = int(0.9 * cfg.total_steps) * cfg.grad_accum if cfg.two_phase else math.inf
    def __next__(self) -> dict:
        cfg, phase = self.cfg, int(self.position >= self.switch)
        if self.phase[0] != phase:
            instances = [x for copy in range(cfg.dupe_factor) for x in create_instances(self.docs, self.tok, cfg, (
                cfg.max_seq_length, cfg.max_position)[phase], random.Random(f"{cfg.seed}-{phase}-{copy}"))]
            require(len(instances) >= cfg.batch_size * WORLD, f"the training data gives {len(instances)} instances, "
                    f"fewer than a batch of {cfg.batch_size * WORLD}; use more data or a smaller --batch_size")
            self.phase = phase, EpochSampler(instances, cfg.batch_size, cfg.seed + phase)
        self.phase[1].position, self.position = self.position - (self.switch if phase else 0), self.position + 1
        return next(self.phase[1])

# Copied from gpt.py: read_tsv
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

# Copied from gpt.py: synthetic_sentiment
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

# Copied from gpt.py: load_classification
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

def encode_classification(rows, tok: WordPiece, labels: dict, max_len: int, split: str) -> list[dict]:
    """`[CLS] A [SEP]`, or `[CLS] A [SEP] B [SEP]` where a tab in the text separates A and B, the longer side cut at its
    end until the pair fits (run_classifier.py's _truncate_seq_pair); a label unseen in training is -1."""
    unknown = [label for label, _ in rows if label not in labels]
    require(split != "train" or not unknown, f"training label {unknown[:1]} is not one of {sorted(labels)}")
    unknown and log0(f"warning: {len(unknown)} {split} examples have labels unseen in training; counted as errors")
    examples = []
    for label, text in rows:
        a, b = (tok.encode(part) for part in text.partition("\t")[::2])
        while len(a) + len(b) > max_len - (3 if b else 2):
            (a if len(a) > len(b) else b).pop()
        examples.append({"ids": [tok.cls_id, *a, tok.sep_id] + ([*b, tok.sep_id] if b else []), "n_a": len(a),
                         "label": labels.get(label, -1)})
    return examples

# Copied from gpt.py: EpochSampler
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
# Stages: pretrain (section 3.1, appendix A.2), finetune (section 4.1)

# Copied from gpt.py: warmup_then_decay
def warmup_then_decay(warmup: int, total: int, floor: float = 0.0, shape: str = "cosine"):
    """The lr multiplier: linear warmup from 0, then cosine (pretraining) or linear (fine-tuning) decay to floor."""
    def f(step):
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if shape == "cosine" else 1 - progress
        return (step + 1) / warmup if step < warmup else floor + (1 - floor) * decay
    return f

# Copied from gpt.py: adamw
def adamw(model: nn.Module, lr: float, weight_decay: float, betas: tuple, eps: float) -> torch.optim.AdamW:
    """Adam with decoupled weight decay on matrices only (none on biases and LayerNorms); fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=params[0].device.type == "cuda")

def load_pretrained(cfg: Config, resumed: dict | None = None) -> tuple[BertForPreTraining, WordPiece, Config]:
    """(model, tokenizer, cfg with its architecture) of a resumed run (the loop loads the weights) or of --init_from
    (--finetune_random_init: its architecture and vocabulary, the weights as build_model draws them)."""
    if cfg.init_from.startswith("hf:") and not resumed:
        return load_hf(Path(cfg.init_from[3:]), cfg)
    ckpt = resumed or load_checkpoint(cfg.init_from)
    cfg = dataclasses.replace(cfg, **{k: ckpt["config"][k] for k in ARCH_FIELDS})
    model, whole = build_model(cfg), ckpt["stage"] == "pretrain"  # a fine-tuned model gives its encoder
    resumed or cfg.finetune_random_init or model.load_state_dict({k: v for k, v in ckpt["model"].items() if whole
                                                                  or k.startswith("bert.")}, whole)
    return model, WordPiece(**ckpt["tokenizer"]), cfg

def pretrain(cfg: Config) -> dict:
    """masked LM and next sentence prediction on --data (section 3.1), after learning the WordPiece vocabulary"""
    ckpt = open_run(cfg, "pretrain", ("data", "lower_case", "wordpiece_vocab_size", "max_seq_length", "dupe_factor",
                                      "max_predictions_per_seq", "two_phase") + (() if cfg.init_from else ARCH_FIELDS))
    device, _, _ = setup(cfg)
    name, train_docs, val_docs = load_documents(cfg.data)
    model, tok, cfg = load_pretrained(cfg, ckpt) if ckpt or cfg.init_from else (None, None, cfg)
    if model is None:
        tok = WordPiece.train((s for d in train_docs for s in d), cfg.wordpiece_vocab_size, cfg.lower_case)
        model = build_model(cfg := dataclasses.replace(cfg, vocab_size=cfg.vocab_size or len(tok.vocab)))
    require(cfg.vocab_size >= len(tok.vocab), f"--vocab_size {cfg.vocab_size} is below the {len(tok.vocab)} tokens")
    train, val = ([d for d in ([ids for ids in map(tok.encode, doc) if ids] for doc in docs) if d]
                  for docs in (train_docs, val_docs))
    require(len(train) >= 2 and len(val) >= 2, f"{cfg.data} gives {len(train)} training and {len(val)} validation "
            "documents; next-sentence prediction needs 2 of each (a blank line ends a document)")
    val_set = create_instances(val, tok, cfg, cfg.max_seq_length, random.Random(f"{cfg.seed}-val"))
    if cfg.eval_batches and len(val_set) > cfg.eval_batches * cfg.batch_size:  # a fixed subset, evenly spread
        val_set = [val_set[i] for i in np.linspace(0, len(val_set) - 1, cfg.eval_batches * cfg.batch_size).astype(int)]
    batches, model = PretrainingSampler(train, tok, cfg), model.to(device)
    log0(f"pretraining on {name}: {len(train)} / {len(val)} documents, a WordPiece vocabulary of {len(tok.vocab)}")
    def evaluate(m):  # over every masked position and every pair
        n = Counter()
        for i in range(0, len(val_set), cfg.batch_size):
            b = {k: v.to(device) for k, v in collate(val_set[i:i + cfg.batch_size]).items()}
            (mlm, nsp), targets = m(b), b["mlm_labels"][b["mlm_labels"] != -100]
            n.update(masked=len(targets), mlm=F.cross_entropy(mlm.float(), targets, reduction="sum").item(),
                     nsp=F.cross_entropy(nsp.float(), b["nsp_labels"], reduction="sum").item(), mlm_acc=(mlm.argmax(
                         -1) == targets).sum().item(), nsp_acc=(nsp.argmax(-1) == b["nsp_labels"]).sum().item())
        return {"loss": n["mlm"] / n["masked"] + n["nsp"] / len(val_set), "mlm_loss": n["mlm"] / n["masked"],
                "mlm_acc": n["mlm_acc"] / n["masked"], "nsp_acc": n["nsp_acc"] / len(val_set)}
    opt = adamw(model, cfg.lr, cfg.weight_decay, (0.9, 0.999), 1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_then_decay(cfg.warmup_steps, cfg.total_steps, shape="linear"))
    metrics = train_loop(cfg, "pretrain", model, opt, sched, batches, pretrain_loss, evaluate, ckpt,
                         total=cfg.total_steps, tokens=cfg.batch_size * cfg.max_seq_length * cfg.grad_accum,
                         flops=flops_per_token(cfg, cfg.max_seq_length, cfg.masked_lm_prob), keep_best=True,
                         extra={"tokenizer": {"vocab": tok.vocab, "lower": tok.lower}})
    if RANK == 0:  # vocab.txt, for Hugging Face's BertTokenizer.from_pretrained(out_dir)
        (Path(cfg.out_dir) / "vocab.txt").write_text("".join(t + "\n" for t in tok.vocab), encoding="utf-8")
    return {**metrics, "data": name}

def finetune(cfg: Config) -> dict:
    """sentence (pair) classification on --finetune_data from a pretrained checkpoint or hf:DIR (section 4.1)"""
    ckpt = open_run(cfg, "finetune", ("finetune_data", "max_seq_length", "finetune_examples", "finetune_random_init"))
    device, _, _ = setup(cfg)  # the architecture is init_from's
    require(cfg.init_from or ckpt, "finetune needs --init_from a checkpoint of bert.py pretrain, or hf:DIR")
    pretrained, tok, cfg = load_pretrained(cfg, ckpt)
    name, train_rows, dev_rows = load_classification(cfg.finetune_data, cfg.seed)
    if 0 < cfg.finetune_examples < len(train_rows):
        train_rows = random.Random(cfg.seed).sample(train_rows, cfg.finetune_examples)
    label_list = ckpt["labels"] if ckpt else sorted({label for label, _ in train_rows})
    labels = {label: i for i, label in enumerate(label_list)}
    train, dev = (encode_classification(rows, tok, labels, cfg.max_seq_length, split)
                  for rows, split in ((train_rows, "train"), (dev_rows, "dev")))
    model, batches = BertClassifier(pretrained.bert, len(labels), cfg.dropout).to(device), EpochSampler(
        train, cfg.finetune_batch_size, cfg.seed)
    total, mean_len = batches.per_epoch * cfg.finetune_epochs, sum(len(e["ids"]) for e in train) / len(train)
    log0(f"fine-tuning on {name} from {'RANDOM INIT' if cfg.finetune_random_init else cfg.init_from}: {len(train)} "
         f"train / {len(dev)} dev examples, labels {label_list}, {total} steps")
    def evaluate(m):
        correct, loss_sum = 0, 0.0
        for i in range(0, len(dev), cfg.finetune_batch_size):
            b = {k: v.to(device) for k, v in collate(dev[i:i + cfg.finetune_batch_size]).items()}
            logits, known = m(b).float(), b["labels"] >= 0
            correct += (logits.argmax(-1) == b["labels"]).sum().item()
            loss_sum += F.cross_entropy(logits[known], b["labels"][known], reduction="sum").item()
        return {"loss": loss_sum / len(dev), "acc": correct / len(dev)}
    opt = adamw(model, cfg.finetune_lr, cfg.weight_decay, (0.9, 0.999), 1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_then_decay(math.ceil(cfg.finetune_warmup * total), total,
                                                                     shape="linear"))
    return {**train_loop(cfg, "finetune", model, opt, sched, batches, lambda m, b: F.cross_entropy(
        m(b).float(), b["labels"]), evaluate, ckpt, total=total, metric="acc",
        tokens=round(cfg.finetune_batch_size * cfg.grad_accum * mean_len), flops=flops_per_token(cfg, round(mean_len)),
        extra={"tokenizer": {"vocab": tok.vocab, "lower": tok.lower}, "labels": label_list}), "data": name,
        "examples": len(train)}

HF_NAMES = {"tok.": "embeddings.word_embeddings.", "pos.": "embeddings.position_embeddings.", "seg.":
            "embeddings.token_type_embeddings.", "bert.ln.": "bert.embeddings.LayerNorm.", "layers.": "encoder.layer.",
            "qkv": "attention.self.{}", "proj": "attention.output.dense", "ln_1": "attention.output.LayerNorm",
            "fc1": "intermediate.dense", "fc2": "output.dense", "ln_2": "output.LayerNorm", "pooler": "pooler.dense",
            "mlm_bias": "cls.predictions.bias", "mlm_dense": "cls.predictions.transform.dense",
            "mlm_ln": "cls.predictions.transform.LayerNorm", "nsp": "cls.seq_relationship"}  # ours -> theirs, in order

def load_hf(root: Path, cfg: Config) -> tuple[BertForPreTraining, WordPiece, Config]:
    """A Hugging Face BertForPreTraining folder with model.safetensors and vocab.txt; cased: --no-lower_case."""
    require((root / "config.json").is_file(), f"{root} has no config.json: hf:DIR needs a Hugging Face model folder")
    hf = json.loads(read_text(root / "config.json"))
    act, eps = hf.get("hidden_act", "gelu"), hf.get("layer_norm_eps", 1e-12)
    require(hf.get("model_type") == "bert" and act == "gelu" and eps == 1e-12, f"{root} holds a {hf.get('model_type')} "
            f"model with {act} and LayerNorm eps {eps}; bert.py runs bert with the exact GELU (gelu) and eps 1e-12")
    require((root / "model.safetensors").is_file(), f"{root} has no model.safetensors (older folders: load the model "
            "in transformers and save_pretrained it again)")
    require(importlib.util.find_spec("safetensors"), "reading model.safetensors needs: pip install safetensors")
    sd = importlib.import_module("safetensors.torch").load_file(str(root / "model.safetensors"))
    cfg = dataclasses.replace(cfg, n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
                              d_model=hf["hidden_size"], d_ff=hf["intermediate_size"], vocab_size=hf["vocab_size"],
                              max_position=hf["max_position_embeddings"], type_vocab_size=hf.get("type_vocab_size", 2))
    model, state = build_model(cfg), {}
    for ours, ref in model.state_dict().items():  # their query, key and value concatenated make our qkv
        theirs = functools.reduce(lambda name, rename: name.replace(*rename), HF_NAMES.items(), ours)
        parts = [theirs.format(n) for n in ("query", "key", "value")] if "{}" in theirs else [theirs]
        require(all(p in sd for p in parts), f"{root} has no weight {parts[0]}; is it a complete BertForPreTraining?")
        state[ours] = torch.cat([sd[p] for p in parts])
        require(state[ours].shape == ref.shape, f"{root}: {theirs} has shape {tuple(state[ours].shape)}, not "
                f"{tuple(ref.shape)}")
    cfg.finetune_random_init or model.load_state_dict(state)
    return model, WordPiece(read_text(root / "vocab.txt").removesuffix("\n").split("\n"), cfg.lower_case), cfg

def main_job(cfg: Config) -> dict:
    """pretrain (out_dir/pretrain), then fine-tune from its best checkpoint (out_dir/finetune) and, the baseline, from
    random weights of the same architecture and vocabulary (out_dir/scratch): the same labels, recipe and seed"""
    root = Path(cfg.out_dir)
    pre, best = pretrain(dataclasses.replace(cfg, out_dir=str(root / "pretrain"))), str(root / "pretrain" / "best.pt")
    w, wo = (finetune(dataclasses.replace(cfg, out_dir=str(root / arm), init_from=best, finetune_random_init=arm ==
                                          "scratch", resume=cfg.resume and (root / arm / "ckpt.pt").exists()))
             for arm in ("finetune", "scratch"))
    claim = {"with": 100 * w["acc"], "without": 100 * wo["acc"], "differs": f"MLM+NSP pretraining on {pre['data']}, "
             f"{pre['step']:,} steps to MLM accuracy {pre['mlm_acc']:.3f}, NSP {pre['nsp_acc']:.3f}, vs random init; "
             f"{w['examples']:,} labels, lr {cfg.finetune_lr:g}, {cfg.finetune_epochs} epochs, seed {cfg.seed} in both"}
    log_metrics(root, f"claim: {w['data']} dev accuracy {claim['with']:.1f} vs {claim['without']:.1f} "
                f"({claim['differs']})", split="claim", task=w["data"], metric="dev accuracy", **claim)
    return {"pretrain": pre, "finetune": w, "scratch": wo, "claim": claim}

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
    return run_main(argv, {None: main_job, "pretrain": pretrain, "finetune": finetune})

if __name__ == "__main__":
    main()
