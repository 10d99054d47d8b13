"""ELMo: deep contextualized word representations from a character-based bidirectional language model.

Paper: Matthew E. Peters, Mark Neumann, Mohit Iyyer, Matt Gardner, Christopher Clark, Kenton Lee, Luke Zettlemoyer,
"Deep contextualized word representations", NAACL 2018, arXiv:1802.05365. Official code: allenai/bilm-tf (training and
the released weights); AllenNLP's modules/elmo.py loads those weights.

What this file reproduces: section 3.1's biLM as bilm-tf builds it (the released model's character ids, a character
CNN, highways and a projection into a forward and a backward stack of clipped, projected LSTMs with one shared softmax,
sampled in training) and trains it (eq. 3 on packed sentence streams, the LSTM state carried between batches in the data
position, so that --resume is exact; Adagrad: bilm_tf_adagrad); sections 3.2-3.3's ELMo (eq. 1, layer normalisation,
lambda ||w||^2) in a task model over the frozen biLM; the released weights (`--init_from allennlp:OPTIONS,WEIGHTS`).

Run it (`--help` lists every field by stage; `task` uses the task_* fields, Adam and AllenNLP's gradient clip of 5)
  python elmo.py   # main job: a small biLM on SST-2's training sentences, 1,000 SST-2 labels with and without ELMo
  python elmo.py pretrain --data wikitext2 --out_dir out/bilm   # sst2 or a folder with train.tsv: its sentences
  python elmo.py task --init_from out/bilm/ckpt.pt --task_data sst2 --out_dir out/sst2   # --no-use_elmo: baseline
  python elmo.py embed --init_from allennlp:options.json,weights.hdf5 --embed_file sents.txt   # out_dir/elmo.hdf5
  torchrun --nproc_per_node=2 elmo.py pretrain ...  # data parallel; each rank carries the state of its own rows

Deviations: negatives drawn with replacement (TensorFlow: unique ones); the backward LM reads the reversed stream in the
forward LM's rows (bilm-tf shuffles the two apart); SST-2's training sentences or WikiText-2 (offline: Python's docs)
for the 1B Word Benchmark; the task: a BiLSTM on SST-2 (the paper's SST-5 model is a BCN with GloVe). Left out: the
cosine schedule (bilm-tf's Adagrad runs at a constant rate); embed's npz output (AllenNLP's `elmo` command writes hdf5,
as embed); --beta1/2, --weight_decay, --adagrad_init; --init_from a task checkpoint's biLM.
"""

from __future__ import annotations

import argparse, atexit, contextlib, dataclasses, functools, hashlib, importlib.util, inspect, json, math, os, random
import collections, re, signal, sys, threading, time, typing, urllib.request
from pathlib import Path

import numpy as np, torch, torch.distributed as dist, torch.nn as nn, torch.nn.functional as F
from einops import rearrange

# -----------------------------------------------------------------------------------------------------
# Config

@dataclasses.dataclass
class Config:
    # model (section 3.1; bilm-tf's bin/train_elmo.py)
    char_embed_dim: int = 16
    filters: str = "1x32,2x32,3x64,4x128,5x256,6x512,7x1024"  # width x count of each character convolution
    n_highway: int = 2
    n_layer: int = 2  # LSTM layers per direction
    lstm_dim: int = 4096  # memory cells per layer and direction
    proj_dim: int = 512  # the LSTMs' projected outputs; also the token representation's width
    cell_clip: float = 3.0
    proj_clip: float = 3.0
    residual: bool = True  # a residual connection around every layer but the first (use_skip_connections)
    vocab_size: int = 0  # softmax words with <S> </S> <UNK>; 0: every training word (1B Word: 793,471)
    n_negative: int = 8192  # sampled softmax negatives per batch; 0: full softmax
    dropout: float = 0.1  # on every LSTM layer's input and on the top layer's output
    # pretrain (bilm-tf: Adagrad lr 0.2, 3 GPUs x 128 rows x 20 unrolled steps, 10 epochs)
    data: str = "wikitext2"  # wikitext2, builtin, text file, folder (train.txt, valid.txt); sst2, train.tsv: sentences
    batch_size: int = 128  # rows of the packed stream
    unroll_steps: int = 20  # tokens of each row per batch (truncated BPTT)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 0.2
    grad_clip: float = 10.0  # global norm, for the gradient of the loss x unroll_steps (bilm-tf's all_clip_norm_val)
    total_steps: int = 1_000_845  # 10 epochs of 768,648,884 tokens in batches of 3 x 128 x 20
    # task (sections 3.2-3.3)
    task_data: str = "sst2"  # sst2, builtin, or a folder with train.tsv and dev.tsv
    task_examples: int = 0  # a subset of the training labels drawn with --seed, the same in both arms (0: all)
    use_elmo: bool = True  # --no-use_elmo: the same classifier without ELMo (the baseline)
    elmo_output: bool = False  # also concatenate a second mix to the task biLSTM's output
    layer_norm: bool = False  # normalise each biLM layer before mixing (bilm-tf's do_layer_norm)
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
    init_from: str = ""  # an elmo.py checkpoint, or allennlp:OPTIONS_JSON,WEIGHTS_HDF5 (the released weights)
    resume: bool = False  # continue the run in out_dir exactly
    max_steps: int = 0  # stop this run at this step (0: run the whole schedule)
    eval_interval: int = 1000
    eval_batches: int = 100  # validation windows per row and evaluation (0: the whole split)
    log_interval: int = 50
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps
    dtype: typing.Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # autocast; master weights stay fp32
    compile: bool = False  # torch.compile the model
    seed: int = 1337

PRESETS = {
    "paper": Config(),
    "small": Config(filters="1x32,2x32,3x64,4x128", proj_dim=128, lstm_dim=512, n_negative=1024, data="sst2",
                    batch_size=32, total_steps=1200, eval_interval=400, eval_batches=20, log_interval=50,
                    task_examples=1000, elmo_output=True, task_embed_dim=100, task_hidden=100, task_epochs=10.0),
    "tiny": Config(char_embed_dim=4, filters="1x4,2x8,3x16", proj_dim=8, lstm_dim=16, vocab_size=300, n_negative=0,
                   batch_size=4, unroll_steps=6, total_steps=8, eval_interval=100, eval_batches=3, log_interval=4,
                   task_examples=200, task_embed_dim=8, task_hidden=8, task_batch_size=8, task_epochs=0.4),
}
ARCH_FIELDS = ("char_embed_dim", "filters", "n_highway", "n_layer", "lstm_dim", "proj_dim", "cell_clip", "proj_clip",
               "residual", "vocab_size")

def validate(cfg: Config) -> None:
    for name in ("char_embed_dim", "n_layer", "lstm_dim", "proj_dim", "batch_size", "unroll_steps", "grad_accum", "lr",
                 "total_steps", "task_embed_dim", "task_hidden", "task_lr", "task_batch_size",
                 "task_epochs", "eval_interval", "log_interval"):
        require(getattr(cfg, name) > 0, f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("n_highway", "vocab_size", "n_negative", "cell_clip", "proj_clip", "grad_clip", "l2_coef", "max_steps",
                 "eval_batches", "task_examples"):
        require(getattr(cfg, name) >= 0, f"--{name} must not be negative, got {getattr(cfg, name)}")
    require(0 <= cfg.dropout < 1 and 0 <= cfg.task_dropout < 1 and cfg.vocab_size not in (1, 2, 3) and
            parse_filters(cfg.filters), "--dropout and --task_dropout must be in [0, 1), --vocab_size 0 or at least 4")

def parse_filters(spec: str) -> list[tuple[int, int]]:
    """"1x32,2x32" -> [(1, 32), (2, 32)]: the (width, count) of each character convolution."""
    pairs = [tuple(int(v) if v.isdecimal() else 0 for v in p.split("x")) for p in spec.split(",")]
    require(all(len(p) == 2 and 0 < p[0] <= MAX_CHARS and p[1] > 0 for p in pairs), f"--filters must look like "
            f"1x32,2x64 (width x count, widths 1 to {MAX_CHARS}), not {spec!r}")
    return pairs

# -----------------------------------------------------------------------------------------------------
# Model (section 3.1): character CNN, highways and a projection; a forward and a backward stack of LSTMs

class CharCNN(nn.Module):
    """x_k (section 3.1; Kim et al. 2016): character convolutions max-pooled over positions, highways y = t relu(W_T x +
    b_T) + (1 - t) x, t = sigmoid(W_C x + b_C) (bilm-tf's "carry", b_C from -2), a projection; bilm-tf's inits."""

    def __init__(self, cfg: Config):
        super().__init__()
        filters = parse_filters(cfg.filters)
        d = sum(n for _, n in filters)  # the highways' width
        self.char_embed = nn.Embedding(N_CHARS, cfg.char_embed_dim, padding_idx=0)  # row 0: padding tokens
        self.convs = nn.ModuleList(nn.Conv1d(cfg.char_embed_dim, n, w) for w, n in filters)
        self.transform, self.carry = (nn.ModuleList(nn.Linear(d, d) for _ in range(cfg.n_highway)) for _ in range(2))
        self.proj = nn.Linear(d, cfg.proj_dim) if d != cfg.proj_dim else nn.Identity()
        nn.init.uniform_(self.char_embed.weight[1:], -1.0, 1.0)
        for conv in self.convs:
            nn.init.uniform_(conv.weight, -0.05, 0.05), nn.init.zeros_(conv.bias)
        for lin in (m for m in self.modules() if isinstance(m, nn.Linear)):  # the highways and the projection
            nn.init.normal_(lin.weight, std=math.sqrt(1.0 / d))
            nn.init.constant_(lin.bias, -2.0 if lin in self.carry else 0.0)

    def forward(self, chars):
        """Characters (B, T, 50) -> x (B, T, P), zero at padding tokens (50 zero ids), and the mask (B, T)."""
        # x_k depends on the token alone: compute it once per distinct token of the batch (U <= B*T)
        words, where = torch.unique(rearrange(chars, "b t c -> (b t) c"), dim=0, return_inverse=True)
        x = rearrange(self.char_embed(words), "u c e -> u e c")  # (U, E, 50)
        # each filter: valid convolution over the characters, max over positions, then ReLU
        h = torch.cat([F.relu(conv(x).max(dim=-1).values) for conv in self.convs], dim=-1)  # (U, F)
        for transform, carry in zip(self.transform, self.carry):
            t = torch.sigmoid(carry(h))
            h = t * F.relu(transform(h)) + (1 - t) * h
        mask = (chars > 0).any(-1)
        return rearrange(self.proj(h)[where], "(b t) p -> b t p", b=chars.size(0)) * mask[..., None], mask

class LstmProjection(nn.Module):
    """One layer of one direction, TensorFlow's LSTMCell(num_proj, cell_clip, proj_clip) (nn.LSTM cannot clip): gates
    (i, j, f, o) from one kernel over [x_t; h_{t-1}], s = sigmoid, padded steps (mask False) keep the state, output 0:
        c_t = clip(s(f + 1) * c_{t-1} + s(i) * tanh(j), +-cell_clip);  h_t = clip(W_p (s(o) * tanh c_t), +-proj_clip)"""

    def __init__(self, d_in: int, cfg: Config):
        super().__init__()
        H, P, self.cell_clip, self.proj_clip = cfg.lstm_dim, cfg.proj_dim, cfg.cell_clip, cfg.proj_clip
        self.kernel, self.proj = nn.Linear(d_in + P, 4 * H), nn.Linear(H, P, bias=False)  # W_0 and B, W_P_0
        for lin in (self.kernel, self.proj):  # TensorFlow's defaults: Glorot uniform, bias 0
            nn.init.xavier_uniform_(lin.weight), lin.bias is None or nn.init.zeros_(lin.bias)

    def forward(self, x, mask, state):
        """x (B, T, D), mask (B, T), state (h (B, P), c (B, H)) -> outputs (B, T, P), the final state."""
        (h, c), outputs = state, []
        W_x, W_h = self.kernel.weight.split([x.size(-1), h.size(-1)], dim=1)
        xw = F.linear(x, W_x)  # (B, T, 4H): the input's half of every step at once
        for t in range(x.size(1)):
            i, j, f, o = (xw[:, t] + F.linear(h, W_h, self.kernel.bias)).float().chunk(4, dim=-1)  # in fp32
            c_new = (torch.sigmoid(f + 1) * c + torch.sigmoid(i) * torch.tanh(j)).clamp(-self.cell_clip, self.cell_clip)
            h_new = self.proj(torch.sigmoid(o) * torch.tanh(c_new)).float().clamp(-self.proj_clip, self.proj_clip)
            m = mask[:, t, None]
            c, h = torch.where(m, c_new, c), torch.where(m, h_new, h)
            outputs.append(h_new * m)
        return torch.stack(outputs, dim=1), (h, c)

class BiLM(nn.Module):
    """The biLM: a token representation, a forward and a backward stack of LstmProjection layers, one softmax. The LSTM
    state (h (2, L, B, P), c (2, L, B, H); None: zeros) is passed in and handed back, never kept in the model."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg, self.drop, self.token_embedder = cfg, nn.Dropout(cfg.dropout), CharCNN(cfg)
        self.stacks = nn.ModuleList(nn.ModuleList(LstmProjection(cfg.proj_dim, cfg) for _ in range(cfg.n_layer))
                                    for _ in ("forward", "backward"))
        self.softmax = nn.Linear(cfg.proj_dim, cfg.vocab_size) if cfg.vocab_size else None  # the released have none
        if self.softmax is not None:  # bilm-tf: W ~ N(0, 1/sqrt(proj_dim)), b = 0
            nn.init.normal_(self.softmax.weight, std=1.0 / math.sqrt(cfg.proj_dim)), nn.init.zeros_(self.softmax.bias)

    def run_lms(self, fwd, bwd, state=None):
        """Both LMs on their (x (B, T, P), mask (B, T)) -> per direction the layers [x, h_1, .., h_L]; the new state."""
        B, L, H, P = fwd[0].size(0), self.cfg.n_layer, self.cfg.lstm_dim, self.cfg.proj_dim
        if state is None:
            state = fwd[0].new_zeros(2, L, B, P, dtype=torch.float32), fwd[0].new_zeros(2, L, B, H, dtype=torch.float32)
        layers, final = [], []
        for d, ((x, mask), stack) in enumerate(zip((fwd, bwd), self.stacks)):
            layers.append([x])
            for j, layer in enumerate(stack):
                inp = self.drop(x)  # bilm-tf's DropoutWrapper(input_keep_prob) on every layer
                h, (h_n, c_n) = layer(inp, mask, (state[0][d, j], state[1][d, j]))
                x = h + inp if self.cfg.residual and j > 0 else h  # a residual from the second layer on
                layers[-1].append(x)
                final.append((h_n.detach(), c_n.detach()))  # truncated BPTT: no gradient into the next batch
        h_n, c_n = (rearrange(torch.stack(s), "(d l) b n -> d l b n", d=2) for s in zip(*final))
        return layers, (h_n, c_n)

    def forward(self, fwd_chars, bwd_chars, fwd_targets, bwd_targets, state=None):
        """The pretraining objective (eq. 3), the mean of the forward and backward LM losses; and the final state."""
        (fwd, bwd), state = self.run_lms(self.token_embedder(fwd_chars), self.token_embedder(bwd_chars), state)
        loss = 0.5 * (self.lm_loss(self.drop(fwd[-1]), fwd_targets) + self.lm_loss(self.drop(bwd[-1]), bwd_targets))
        return loss, state

    def lm_loss(self, h, targets):
        """Cross-entropy of the shared softmax in fp32; in training with n_negative, the sampled softmax: the true word
        against S negatives drawn from TensorFlow's log-uniform sampler over the frequency-sorted vocabulary,
        Q(k) = log((k+2)/(k+1)) / log(V+1), each logit less the log of its expected count in S draws, S Q(k)."""
        h, targets = h.flatten(0, 1).float(), targets.flatten()
        W, b = self.softmax.weight.float(), self.softmax.bias.float()
        V, S = W.size(0), self.cfg.n_negative
        if not (self.training and 0 < S < V):
            return F.cross_entropy(h @ W.T + b, targets)
        sampled = ((torch.rand(S, device=h.device) * math.log(V + 1)).exp() - 1).long().clamp(max=V - 1)  # (S,) ~ Q
        log_sq = torch.log(S * torch.log1p(1.0 / torch.arange(1.0, V + 1, device=h.device)) / math.log(V + 1))
        true = (h * W[targets]).sum(-1) + b[targets] - log_sq[targets]  # (N,)
        neg = h @ W[sampled].T + b[sampled] - log_sq[sampled]  # (N, S)
        neg = neg.masked_fill(sampled[None, :] == targets[:, None], float("-inf"))  # accidental hits
        return F.cross_entropy(torch.cat([true[:, None], neg], dim=1), torch.zeros_like(targets))

    def activations(self, chars, state=None):
        """Section 3.2's representations of right-padded sentences, chars (B, T, 50) -> layers (B, L+1, T, 2P), layer 0
        [x; x] and layer j [h_fwd_j; h_bwd_j], the mask (B, T) and the final state; `<S>`/`</S>` framed as ELMo does."""
        mask = (chars > 0).any(-1)
        framed = F.pad(chars, (0, 0, 1, 1))  # (B, T+2, 50): room for <S> and </S>
        framed[:, 0] = framed.new_tensor(token_chars("<S>"))
        framed[torch.arange(len(chars), device=chars.device), mask.sum(1) + 1] = framed.new_tensor(token_chars("</S>"))
        x, framed_mask = self.token_embedder(framed)  # computed once for both LMs
        # the backward LM reads each row from its end: flipped, a row's padding comes first and keeps the state
        (fwd, bwd), state = self.run_lms((x, framed_mask), (x.flip(1), framed_mask.flip(1)), state)
        layers = torch.stack([torch.cat([f, b.flip(1)], dim=-1) for f, b in zip(fwd, bwd)], dim=1)  # (B, L+1, T+2, 2P)
        return layers[:, :, 1:-1] * mask[:, None, :, None], mask, state

    def flops_per_token(self) -> float:
        """Training FLOPs per token, 6 x the multiply-adds: the char CNN's, both directions' LSTMs, the softmax's."""
        cfg, filters, P = self.cfg, parse_filters(self.cfg.filters), self.cfg.proj_dim
        d, V = sum(n for _, n in filters), cfg.n_negative if 0 < cfg.n_negative < cfg.vocab_size else cfg.vocab_size
        cnn = sum(w * cfg.char_embed_dim * n * (MAX_CHARS - w + 1) for w, n in filters) + 2 * cfg.n_highway * d * d
        return 6.0 * 2 * (cnn + d * P + cfg.n_layer * 9 * P * cfg.lstm_dim + P * V)  # per direction: 9PH a layer

build_model = BiLM

# -----------------------------------------------------------------------------------------------------
# Objective: the joint log-likelihood of both directions (eq. 3), in fp32

def pretrain_loss(model, batch: dict, stream=None) -> torch.Tensor:
    """From the state in the batch (h0, c0; none: zeros); the final state goes to `stream.state`, the next batch's."""
    state = (batch["h0"], batch["c0"]) if "h0" in batch else None
    loss, final = model(batch["fwd_chars"], batch["bwd_chars"], batch["fwd_targets"], batch["bwd_targets"], state)
    if stream is not None:
        stream.state = final
    return loss

# -----------------------------------------------------------------------------------------------------
# Downstream: ELMo (section 3.2) in a task model (section 3.3)

class Elmo(nn.Module):
    """n_mixes mixes ELMo_k = gamma sum_j s_j h_kj, s = softmax(w) (eq. 1; w from 0, gamma 1) over one frozen biLM pass,
    then dropout; layer_norm first normalises each layer by its mean and variance over the batch's real tokens."""

    def __init__(self, bilm: BiLM, n_mixes: int, dropout: float, layer_norm: bool):
        super().__init__()
        self.bilm, self.drop, self.layer_norm = bilm.requires_grad_(False), nn.Dropout(dropout), layer_norm
        self.w, self.gamma = nn.Parameter(torch.zeros(n_mixes, bilm.cfg.n_layer + 1)), nn.Parameter(torch.ones(n_mixes))

    def forward(self, chars):
        """chars (B, T, 50) -> ELMo (n_mixes, B, T, 2P)."""
        with torch.no_grad():  # the frozen biLM always runs in evaluation mode, without dropout
            layers, mask, _ = self.bilm.eval().activations(chars)  # (B, L+1, T, 2P)
        if self.layer_norm:
            real = layers.transpose(0, 1)[:, mask]  # (L+1, N, 2P): each layer's vectors of the real tokens
            mean, var = real.mean(dim=(1, 2)), real.var(dim=(1, 2), correction=0)
            layers = (layers - mean[:, None, None]) / torch.sqrt(var[:, None, None] + 1e-12)
        return self.drop(torch.einsum("k,kl,bltd->kbtd", self.gamma, self.w.softmax(-1), layers))

class Classifier(nn.Module):
    """[x_k; ELMo_k] into a BiLSTM ([h_k; ELMo'_k] out: elmo_output), max pool, dropout, linear; no biLM: baseline."""

    def __init__(self, cfg: Config, n_words: int, n_classes: int, bilm: BiLM | None):
        super().__init__()
        self.embed, self.drop = nn.Embedding(n_words, cfg.task_embed_dim, padding_idx=0), nn.Dropout(cfg.task_dropout)
        self.elmo = Elmo(bilm, 1 + cfg.elmo_output, cfg.task_dropout, cfg.layer_norm) if bilm else None
        d_elmo, self.elmo_output = (2 * bilm.cfg.proj_dim, cfg.elmo_output) if bilm else (0, False)
        self.lstm = nn.LSTM(cfg.task_embed_dim + d_elmo, cfg.task_hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * cfg.task_hidden + (d_elmo if self.elmo_output else 0), n_classes)

    def forward(self, word_ids, chars, lengths):
        """word_ids (B, T), chars (B, T, 50), lengths (B,) -> logits (B, n_classes)."""
        x = self.drop(self.embed(word_ids))  # (B, T, E)
        if self.elmo is not None:  # the input: [x_k; ELMo_k]
            x = torch.cat([x, (elmo := self.elmo(chars).to(x.dtype))[0]], dim=-1)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        h, _ = nn.utils.rnn.pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=word_ids.size(1))
        if self.elmo_output:
            h = torch.cat([h, elmo[1].to(h.dtype)], dim=-1)  # the output: [h_k; ELMo'_k]
        pad = torch.arange(word_ids.size(1), device=word_ids.device)[None, :] >= lengths[:, None]
        return self.head(self.drop(h.masked_fill(pad[..., None], float("-inf")).max(dim=1).values))

def task_loss(model: Classifier, batch: dict, l2_coef: float) -> torch.Tensor:
    """Cross-entropy plus lambda ||w||^2 on the mix weights (section 3.2); the metric is accuracy."""
    logits, elmo = model(batch["word_ids"], batch["chars"], batch["lengths"]), getattr(model, "module", model).elmo
    return F.cross_entropy(logits.float(), batch["labels"]) + l2_coef * (0.0 if elmo is None else (elmo.w ** 2).sum())

# -----------------------------------------------------------------------------------------------------
# Vocabulary: the released ELMo's character ids, and the softmax's words

MAX_CHARS, N_CHARS = 50, 262  # characters per token (begin and end of word too); ids: 261, shifted by +1, 0 pads
BOS_CHAR, EOS_CHAR, BOW_CHAR, EOW_CHAR, PAD_CHAR = 256, 257, 258, 259, 260  # after the 256 byte values
SPECIAL_WORDS = ("<S>", "</S>", "<UNK>")  # the first three words of bilm-tf's vocabulary files

def token_chars(word: str) -> list[int]:
    """The 50 character ids of one token, shifted by +1 (so that no id is 0)."""
    body = {"<S>": [BOS_CHAR], "</S>": [EOS_CHAR]}.get(word) or list(word.encode("utf-8", "ignore")[:MAX_CHARS - 2])
    return [i + 1 for i in [BOW_CHAR, *body, EOW_CHAR] + [PAD_CHAR] * (MAX_CHARS - 2 - len(body))]

def batch_chars(sentences: list[list[str]]) -> torch.Tensor:
    """Character ids (B, T, 50) of right-padded sentences; a padding token is 50 zeros."""
    T = max(map(len, sentences), default=0)
    rows = [[token_chars(w) for w in words] + [[0] * MAX_CHARS] * (T - len(words)) for words in sentences]
    return torch.tensor(rows, dtype=torch.long).view(len(sentences), T, MAX_CHARS)

class WordTable:
    """Softmax words (specials, then by frequency, as the log-uniform sampler needs), then the rest; their char ids."""

    def __init__(self, vocab: list[str] | None, train: list[str], other: list[str], vocab_size: int):
        counts = collections.Counter(w for w in train if w not in SPECIAL_WORDS)
        self.vocab = vocab or [*SPECIAL_WORDS, *sorted(counts, key=lambda w: (-counts[w], w))][:vocab_size or None]
        self.types = self.vocab + sorted(set(train + other) - set(self.vocab))
        self.index = {w: i for i, w in enumerate(self.types)}
        self.chars = torch.tensor([token_chars(w) for w in self.types])  # (n_types, 50)
        self.softmax_id = torch.tensor([i if i < len(self.vocab) else 2 for i in range(len(self.types))])  # 2: <UNK>

# -----------------------------------------------------------------------------------------------------
# Data: sentence streams for the biLM, labelled sentences for the task

DATASETS = {  # name -> {file in the cache: (pinned URL, sha256)}; ../shared/data/URLS.md lists them all
    "wikitext2": {f"{s}.txt": ("https://raw.githubusercontent.com/pytorch/examples/77f55b912142e11fcfdf5b530231fb9c"
                               f"52f181e8/word_language_model/data/wikitext-2/{s}.txt", h) for s, h in (
        ("train", "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f"),
        ("valid", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"))},
    "sst2": {f"{s}.tsv": ("https://raw.githubusercontent.com/eyalbd2/Reproducing-AutoPrompt/6288fb5bec9c572f2492875ae0"
                          f"111df5b6daed11/glue_data/SST-2/{f}.tsv", h) for s, f, h in (  # train_full: all of it
        ("train", "train_full", "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1"),
        ("dev", "dev", "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0"))},
}

# Copied from gpt.py: load_lm_text
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

def pretraining_text(data: str) -> tuple[str, str, str]:
    """load_lm_text's, but of a labelled set (sst2, a folder with train.tsv): its training sentences, labels unused,
    the last tenth for validation; its dev set is never read. sst2 offline: the built-in corpus."""
    root = download(data, "the built-in corpus (Python documentation)") if data == "sst2" else Path(data)
    if root is None or not (root / "train.tsv").is_file():
        return load_lm_text("builtin" if root is None else data)
    lines = [text for _, text in read_tsv(root / "train.tsv")]
    cut = len(lines) - len(lines) // 10
    return f"{root.name} training sentences", "\n".join(lines[:cut]), "\n".join(lines[cut:])

def sentence_stream(text: str) -> list[str]:
    """Every non-empty line as a sentence `<S> w1 .. wn </S>`, all packed into one stream (bilm-tf's)."""
    return [w for line in text.split("\n") if line.split() for w in ("<S>", *line.split(), "</S>")]

class StreamSampler:
    """Consecutive windows of the rows of a stream and of the reversed stream, so that the LSTM state carried from batch
    to batch (pretrain_loss leaves it in `state`) continues its text; `position` is the offset and that state."""

    def __init__(self, words: list[str], table: WordTable, batch_size: int, unroll_steps: int, split="training"):
        ids = torch.tensor([table.index[w] for w in words])
        ids = ids.chunk(WORLD)[RANK] if split == "training" else ids  # in training each rank reads its own shard
        n, self.table, self.unroll_steps = len(ids) // batch_size, table, unroll_steps  # row b continues row b
        self.fwd, self.bwd = (s[:batch_size * n].view(batch_size, n) for s in (ids, ids.flip(0)))
        self.windows, self.pos, self.state = (n - 1) // unroll_steps, 0, None
        require(self.windows > 0, f"the {split} text has {len(ids)} words (per rank), too few for {batch_size} rows "
                f"of {unroll_steps + 1}; use more data or a smaller --batch_size or --unroll_steps")

    @property
    def position(self) -> dict:
        return {"pos": self.pos, "state": None if self.state is None else tuple(s.cpu() for s in self.state)}

    @position.setter
    def position(self, position: dict):
        self.pos, self.state = position["pos"], position["state"]

    def __next__(self) -> dict:
        """Both streams' next window: characters (B, T, 50), the next words' softmax ids (B, T), the state (h0, c0)."""
        if self.pos + self.unroll_steps + 1 > self.fwd.size(1):
            self.pos = 0  # a new epoch: the rows start over, the state carries on
        fwd, bwd = (rows[:, self.pos:self.pos + self.unroll_steps + 1] for rows in (self.fwd, self.bwd))
        self.pos, t = self.pos + self.unroll_steps, self.table
        batch = {"fwd_chars": t.chars[fwd[:, :-1]], "fwd_targets": t.softmax_id[fwd[:, 1:]],
                 "bwd_chars": t.chars[bwd[:, :-1]], "bwd_targets": t.softmax_id[bwd[:, 1:]]}
        return batch if self.state is None else {**batch, "h0": self.state[0], "c0": self.state[1]}

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

def collate(examples: list[dict]) -> dict:
    """Right-padded word ids (B, T) and characters (B, T, 50), lengths (B,) and labels (B,)."""
    lengths = [len(e["ids"]) for e in examples]
    return {"word_ids": torch.tensor([e["ids"] + [0] * (max(lengths) - len(e["ids"])) for e in examples]),
            "chars": batch_chars([e["tokens"] for e in examples]), "lengths": torch.tensor(lengths),
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

# -----------------------------------------------------------------------------------------------------
# Stages: pretrain (section 3.1 and bilm-tf's recipe), task (sections 3.2-3.3), embed

def bilm_tf_adagrad(model: nn.Module, cfg: Config) -> tuple[torch.optim.Adagrad, float]:
    """bilm-tf's optimiser for the gradient g of the mean loss, and the norm to clip g at. bilm-tf differentiates the
    loss times k = unroll_steps, clips that at global norm c, runs Adagrad (TensorFlow's: no epsilon) from accumulator
    a. As clip(k g, c) = k clip(g, c/k) and k g / sqrt(a + sum (k g)^2) = g / sqrt(a/k^2 + sum g^2), Adagrad from a/k^2
    with g clipped at c/k makes the same updates, at any k."""
    return torch.optim.Adagrad([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, eps=0.0,  # a = 1
                               initial_accumulator_value=1.0 / cfg.unroll_steps ** 2), cfg.grad_clip / cfg.unroll_steps

def load_pretrained(cfg: Config, resumed: dict | None = None) -> tuple[BiLM, list | None, Config]:
    """(biLM, softmax vocabulary, cfg with its architecture) of --init_from or of a resumed run (the loop loads it)"""
    require(resumed or cfg.init_from, "needs --init_from a pretrained biLM (an elmo.py pretrain ckpt.pt or "
            "allennlp:OPTIONS_JSON,WEIGHTS_HDF5); task --no-use_elmo trains the baseline without one")
    if cfg.init_from.startswith("allennlp:") and not resumed:
        return load_allennlp(*cfg.init_from.removeprefix("allennlp:").partition(",")[::2], cfg)
    ckpt = resumed or load_checkpoint(cfg.init_from, ("pretrain",))
    arch = ckpt["bilm_config"] if ckpt["stage"] == "task" else ckpt["config"]  # a resumed task: its biLM's
    cfg = dataclasses.replace(cfg, **{k: arch[k] for k in ARCH_FIELDS})
    model = build_model(cfg)
    resumed or model.load_state_dict(ckpt["model"])
    return model, ckpt.get("vocab"), cfg

def load_allennlp(options_path: str, weights_path: str, cfg: Config) -> tuple[BiLM, None, Config]:
    """An ELMo options file's biLM with its TensorFlow hdf5 weights: (in, out) kernels transposed, character 0 zero."""
    require(options_path and weights_path, "--init_from allennlp: needs OPTIONS_JSON,WEIGHTS_HDF5")
    require(importlib.util.find_spec("h5py"), "reading the released ELMo weights needs h5py: pip install h5py")
    try:
        lstm, cnn = (json.loads(read_text(options_path))[k] for k in ("lstm", "char_cnn"))
        require(cnn.get("activation", "relu") == "relu" and cnn["max_characters_per_token"] == MAX_CHARS,
                f"{options_path}: only relu character CNNs over {MAX_CHARS} characters are supported")
        cfg = dataclasses.replace(cfg, char_embed_dim=cnn["embedding"]["dim"], n_highway=cnn["n_highway"], vocab_size=0,
            filters=",".join(f"{w}x{n}" for w, n in cnn["filters"]), n_layer=lstm["n_layers"], lstm_dim=lstm["dim"],
            proj_dim=lstm["projection_dim"], cell_clip=float(lstm.get("cell_clip") or math.inf),
            proj_clip=float(lstm.get("proj_clip") or math.inf), residual=bool(lstm.get("use_skip_connections")))
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{options_path} is not an ELMo options file ({e.__class__.__name__}: {e})") from None
    h5py, model, state = importlib.import_module("h5py"), build_model(cfg), {}
    require(h5py.is_hdf5(weights_path), f"{weights_path} does not exist or is not an hdf5 file")

    def w(name):  # one TensorFlow weight
        require(name in f, f"{weights_path} has no weight {name}; do the options match the weights?")
        return torch.from_numpy(np.asarray(f[name], dtype=np.float32))
    with h5py.File(weights_path, "r") as f:
        state["token_embedder.char_embed.weight"] = F.pad(w("char_embed"), (0, 0, 1, 0))
        for i in range(len(model.token_embedder.convs)):
            state[f"token_embedder.convs.{i}.weight"] = rearrange(w(f"CNN/W_cnn_{i}")[0], "w e n -> n e w")
            state[f"token_embedder.convs.{i}.bias"] = w(f"CNN/b_cnn_{i}")
        for i in range(cfg.n_highway):
            for part in ("transform", "carry"):
                tf, ours = f"CNN_high_{i}/", f"token_embedder.{part}.{i}."
                state[ours + "weight"], state[ours + "bias"] = w(f"{tf}W_{part}").T, w(f"{tf}b_{part}")
        if isinstance(model.token_embedder.proj, nn.Linear):
            state["token_embedder.proj.weight"] = w("CNN_proj/W_proj").T
            state["token_embedder.proj.bias"] = w("CNN_proj/b_proj")
        for d in range(2):
            for j in range(cfg.n_layer):
                tf, ours = f"RNN_{d}/RNN/MultiRNNCell/Cell{j}/LSTMCell/", f"stacks.{d}.{j}."
                state[ours + "kernel.weight"], state[ours + "kernel.bias"] = w(tf + "W_0").T, w(tf + "B")
                state[ours + "proj.weight"] = w(tf + "W_P_0").T
    wrong = [f"{k} {tuple(v.shape)}" for k, v in model.state_dict().items() if state[k].shape != v.shape]
    require(not wrong, f"{weights_path} does not fit {options_path}: expected {', '.join(wrong[:1])}")
    model.load_state_dict(state)
    return model, None, cfg

def pretrain(cfg: Config) -> dict:
    """the biLM on --data: packed sentence streams, the LSTM state carried between batches (bilm-tf)"""
    ckpt = open_run(cfg, "pretrain", ARCH_FIELDS + ("data", "batch_size", "unroll_steps"))
    device, _, _ = setup(cfg)
    name, train_text, val_text = pretraining_text(cfg.data)
    train_words, val_words = sentence_stream(train_text), sentence_stream(val_text)
    model, vocab, cfg = load_pretrained(cfg, ckpt) if ckpt or cfg.init_from else (None, None, cfg)
    require(model is None or vocab, f"{cfg.init_from} has no softmax vocabulary to continue pretraining with")
    table = WordTable(vocab, train_words, val_words, cfg.vocab_size)
    cfg = dataclasses.replace(cfg, vocab_size=len(table.vocab))
    batches, val = (StreamSampler(words, table, cfg.batch_size, cfg.unroll_steps, split)
                    for words, split in ((train_words, "training"), (val_words, "validation")))
    model = (model or build_model(cfg)).to(device)
    unk, n_params = (table.softmax_id[batches.fwd] == 2).float().mean(), sum(p.numel() for p in model.parameters())
    log0(f"pretraining on {name}: {len(train_words):,} train / {len(val_words):,} val words, vocab {cfg.vocab_size} "
         f"({unk:.1%} of training words <UNK>), {n_params / 1e6:.2f}M parameters")
    def evaluate(m):  # the full softmax; the validation stream carries its own state, from zeros
        val.position, n = {"pos": 0, "state": None}, min(val.windows, cfg.eval_batches or val.windows)
        loss = sum(pretrain_loss(m, {k: v.to(device) for k, v in next(val).items()}, val).item() for _ in range(n)) / n
        return {"loss": loss, "ppl": math.exp(min(loss, 700))}
    opt, clip = bilm_tf_adagrad(model, cfg)
    return {"data": name, **train_loop(dataclasses.replace(cfg, grad_clip=clip), "pretrain", model, opt, None, batches,
            lambda m, b: pretrain_loss(m, b, batches), evaluate, ckpt, total=cfg.total_steps, keep_best=True,
            tokens=cfg.batch_size * cfg.unroll_steps * cfg.grad_accum, flops=model.flops_per_token(),
            extra={"vocab": table.vocab})}

def task(cfg: Config) -> dict:
    """the BiLSTM classifier on --task_data with ELMo from a frozen biLM (--init_from), or without (--no-use_elmo)"""
    ckpt = open_run(cfg, "task", ("task_data", "task_examples", "task_embed_dim", "task_hidden"))
    device, _, _ = setup(cfg)
    require(not ckpt or ckpt["config"]["use_elmo"] == cfg.use_elmo, f"{cfg.out_dir} holds a run with --use_elmo "
            f"{not cfg.use_elmo}; resume it so (--{'no-' if cfg.use_elmo else ''}use_elmo)")
    bilm, _, bilm_cfg = load_pretrained(cfg, ckpt) if cfg.use_elmo else (None, None, None)
    name, train_rows, dev_rows = load_classification(cfg.task_data, cfg.seed)
    if cfg.task_examples:  # the same subset in both arms and on resume
        train_rows = random.Random(cfg.seed).sample(train_rows, min(cfg.task_examples, len(train_rows)))
    label_list = ckpt["labels"] if ckpt else sorted({label for label, _ in train_rows})
    word_list = ckpt["words"] if ckpt else ["<pad>", "<unk>"] + sorted({w for _, t in train_rows for w in t.split()})
    labels, words = {y: i for i, y in enumerate(label_list)}, {w: i for i, w in enumerate(word_list)}
    unseen = [[y for y, _ in rows if y not in labels] for rows in (train_rows, dev_rows)]
    require(not unseen[0], f"training label {unseen[0][:1]} is not one of {label_list}")
    unseen[1] and log0(f"warning: {len(unseen[1])} dev examples have labels unseen in training; counted as errors")
    train, dev = ([{"tokens": t.split(), "ids": [words.get(w, 1) for w in t.split()], "label": labels.get(y, -1)}
                   for y, t in rows] for rows in (train_rows, dev_rows))  # unknown words: <unk>; labels: -1, wrong
    model = Classifier(cfg, len(word_list), len(labels), bilm).to(device)
    batches = EpochSampler(train, cfg.task_batch_size, cfg.seed)
    total = max(1, math.ceil(batches.per_epoch * cfg.task_epochs))
    log0(f"task on {name}: {len(train)} train / {len(dev)} dev, {total} steps, {'with' if bilm else 'no'} ELMo")
    def evaluate(m):  # over the whole dev set; an unseen label (-1) counts as an error
        parts = (collate(dev[i:i + cfg.task_batch_size]) for i in range(0, len(dev), cfg.task_batch_size))
        logits = torch.cat([m(*(b[k].to(device) for k in ("word_ids", "chars", "lengths"))) for b in parts]).float()
        gold = torch.tensor([e["label"] for e in dev], device=device)
        loss = F.cross_entropy(logits[gold >= 0], gold[gold >= 0], reduction="sum").item() / len(dev)
        return {"loss": loss, "acc": (logits.argmax(-1) == gold).float().mean().item()}
    tokens = round(cfg.task_batch_size * cfg.grad_accum * sum(len(e["ids"]) for e in train) / len(train))
    params = [p for p in model.parameters() if p.requires_grad]  # the frozen biLM runs forward only: a third
    flops = 6.0 * sum(p.numel() for p in params) + (bilm.flops_per_token() / 3 if bilm else 0.0)
    opt, loss_fn = torch.optim.Adam(params, cfg.task_lr), lambda m, b: task_loss(m, b, cfg.l2_coef)
    return {"data": name, "examples": len(train), **train_loop(dataclasses.replace(cfg, grad_clip=5.0), "task", model,
            opt, None, batches, loss_fn, evaluate, ckpt, total=total, tokens=tokens, flops=flops, metric="acc",
            extra={"labels": label_list, "words": word_list, "bilm_config": bilm_cfg and dataclasses.asdict(bilm_cfg)})}

def embed(cfg: Config) -> dict:
    """ELMo's layers for every line of --embed_file into out_dir/elmo.hdf5, as AllenNLP's `elmo` command"""
    require(cfg.embed_file, "embed needs --embed_file: a text file with one whitespace-tokenised sentence per line")
    require(importlib.util.find_spec("h5py"), "embed writes hdf5 (as AllenNLP) with h5py: pip install h5py")
    lines = read_text(cfg.embed_file).removesuffix("\n").split("\n")  # an empty line gets an empty array
    model, _, cfg = load_pretrained(cfg)
    # The vectors are what a user keeps: `auto` computes them in fp32 (bf16 would round them away from the released
    # model's); --dtype bfloat16 asks for the faster, rounded ones explicitly.
    device, _, ctx = setup(dataclasses.replace(cfg, dtype="float32" if cfg.dtype == "auto" else cfg.dtype))
    model, out = model.to(device).eval(), Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), ctx, importlib.import_module("h5py").File(out / ".elmo.hdf5.tmp", "w") as f:
        for i in range(0, len(lines), cfg.batch_size):
            sentences = [line.split() for line in lines[i:i + cfg.batch_size]]
            layers, _, _ = model.activations(batch_chars(sentences).to(device))  # from a zero state
            for k, words in enumerate(sentences):
                f.create_dataset(str(i + k), data=layers[k, :, :len(words)].float().cpu().numpy())  # (L+1, n, 2P)
    os.replace(out / ".elmo.hdf5.tmp", out / "elmo.hdf5")  # a finished file or none
    log0(f"wrote ELMo layers (layers, tokens, {2 * cfg.proj_dim}) of {len(lines)} lines to {out / 'elmo.hdf5'}")
    return {"path": str(out / "elmo.hdf5"), "sentences": len(lines)}

def main_job(cfg: Config) -> dict:
    """pretrain into out_dir/pretrain, then the same task with ELMo (out_dir/task) and without it (out_dir/baseline)"""
    root = Path(cfg.out_dir)
    lm = pretrain(dataclasses.replace(cfg, out_dir=str(root / "pretrain")))
    elmo = task(dataclasses.replace(cfg, out_dir=str(root / "task"), init_from=str(root / "pretrain" / "best.pt")))
    base = task(dataclasses.replace(cfg, out_dir=str(root / "baseline"), use_elmo=False))
    w, wo, ppl = round(100 * elmo["acc"], 2), round(100 * base["acc"], 2), math.exp(min(lm["best"], 700))
    differs = (f"the same BiLSTM on {elmo['examples']:,} labels with ELMo vs without; biLM: {lm['step']:,} steps on "
               f"{lm['data']}, val ppl {ppl:.0f}")
    log_metrics(root, f"claim: {elmo['data']} dev accuracy {w:.1f} vs {wo:.1f} ({differs})", split="claim",
                task=elmo["data"], metric="dev accuracy", **{"with": w, "without": wo}, differs=differs)
    return {"pretrain": lm, "task": elmo, "baseline": base, "claim": {"with": w, "without": wo, "differs": differs}}

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
    return run_main(argv, {None: main_job, "pretrain": pretrain, "task": task, "embed": embed})

if __name__ == "__main__":
    main()
