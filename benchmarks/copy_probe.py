"""How fast does a RETRO model learn to read its neighbours? Training levers against a copy probe (issue 16).

Trains the demo's model (configs/demo.yaml's sizes) in a plain loop on a built workspace and, every
`--eval_every` steps, prints two losses (nats per token) with retrieval ON and OFF:

- copy probe: training sequences whose every chunk has, in its last neighbour slot, a copy of its own text and
  continuation (`RetroDataset(copy_neighbor_rate=1)`): ON far below OFF means the copying pathway has formed;
- val: validation sequences with their retrieved neighbours: ON below OFF means natural neighbours help.

Levers: `--copy_rate` (the copy warm-up, `data.copy_neighbor_rate`), `--k`, `--tie` (`tied`: share the token
embedding with the output head; `init`: the head starts as a copy of the embedding), `--cca_value_init c`
(experiment only: CCA's value projection starts as the identity and its output projection as c times it, a
bag-of-neighbour-tokens path from step 0), `--retrieval_lr_scale` (LR multiplier of the encoder and CCA), and two
experiment-only architecture levers (`--lever`): `smear` (the CCA key of neighbour token j mixes in token j-1's key
with a learned weight: a built-in previous-token head, the "smeared key" shortcut to induction-style copying) and
`pointer` (a copy head beside the LM: position p attends, with CCA's causality, over the K*R neighbour tokens,
matching (x_{p-1}, x_p) against (n_{j-2}, n_{j-1}) in a learned embedding, and puts that attention on n_j;
p = (1-g) p_LM + g p_copy with a learned gate g(h_p). Not RETRO: an upper bound on what copying from these
neighbours can buy after these steps); `induction` (RETRO, initialised: the first CCA layer starts as an
induction head over the neighbours: `model.config.cca_init: induction`, see `retro_lit.model.induction_init`).

    python benchmarks/copy_probe.py --workspace W --kfile 4 --k 1 --copy_rate 0.5 --tie tied --cca_value_init 0.05

W must hold neighbours for `--kfile` and `--seq_len` (retro-lit build-db --num_neighbors --seq_len).
"""

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retro_lit.data import RetroDataset
from retro_lit.lit import warmup_cosine
from retro_lit.model import RetroConfig, RetroModel
from retro_lit.tokenizer import workspace_tokenizer
from retro_lit.workspace import open_workspace


def build_model(args, vocab_size: int, chunk_len: int) -> RetroModel:
    induction = args.lever == "induction"
    config = RetroConfig(vocab_size=vocab_size, chunk_size=chunk_len, d_model=256, n_layer=4, n_head=4, head_dim=64,
                         d_ff=1024, cca_layers=(1, 3), enc_n_layer=2, enc_cross_layers=(0,), tie_embeddings=induction,
                         cca_init="induction" if induction else "normal")
    model = RetroModel.from_config(config)
    with torch.no_grad():
        if args.tie == "tied":
            model.lm_head.weight = model.token_emb.weight
        elif args.tie == "init":
            model.lm_head.weight.copy_(model.token_emb.weight)
        if args.cca_value_init > 0:
            for block in model.blocks:
                if block.cca is not None:
                    key_value = block.cca.attn.key_value.weight  # (2*H*Dh, E): keys, then values
                    half = key_value.shape[0] // 2
                    key_value[half:].copy_(torch.eye(half, key_value.shape[1]))
                    block.cca.attn.out.weight.copy_(args.cca_value_init * torch.eye(*block.cca.attn.out.weight.shape))
    if args.lever == "smear":
        for block in model.blocks:
            if block.cca is not None:
                block.cca.key_smear = nn.Parameter(torch.zeros(1))  # key weight sigmoid(0) = 1/2 on token j
    elif args.lever == "pointer":
        model.pointer = PointerHead(vocab_size, config.d_model)
    return model


class PointerHead(nn.Module):
    """Copy head over the neighbours: log p = log((1-g) p_LM + g p_copy), see the module docstring."""

    def __init__(self, vocab_size: int, d_model: int):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, 64)
        nn.init.normal_(self.emb.weight)
        self.tau = nn.Parameter(torch.tensor([8.0, 4.0]))  # temperatures of the x_p and x_{p-1} matches
        self.gate = nn.Linear(d_model, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, -2.0)

    def forward(self, logp: torch.Tensor, h: torch.Tensor, x: torch.Tensor, neighbors: torch.Tensor, M: int):
        """logp (B, T, V) LM log-probs, h (B, T, D), x (B, T), neighbors (B, L, K, R) -> mixed log-probs."""
        T, L = x.shape[1], neighbors.shape[1]
        u = (torch.arange(T) + 1) // M - 1  # the chunk whose neighbours position p reads, as in CCA
        nb = neighbors[:, u.clamp(0, L - 1)]  # (B, T, K, R)
        pad = torch.full_like(nb[..., :1], -1)
        prev1, prev2 = torch.cat([pad, nb[..., :-1]], -1), torch.cat([pad, pad, nb[..., :-2]], -1)
        nb, prev1, prev2 = (t.flatten(2) for t in (nb, prev1, prev2))  # (B, T, K*R)
        x_prev = torch.cat([torch.full_like(x[:, :1], -1), x[:, :-1]], 1)
        e = lambda t: F.normalize(self.emb(t.clamp(min=0)).float(), dim=-1)
        score = (self.tau[0] * (e(x)[:, :, None] * e(prev1)).sum(-1)
                 + self.tau[1] * (e(x_prev)[:, :, None] * e(prev2)).sum(-1) * ((prev2 >= 0) & (x_prev >= 0)[..., None]))
        valid = (nb >= 0) & (prev1 >= 0) & ((u >= 0) & (u < L))[None, :, None]
        attn = torch.softmax(score.masked_fill(~valid, -1e4), -1) * valid  # (B, T, K*R)
        p_copy = torch.zeros_like(logp).scatter_add_(-1, nb.clamp(min=0), attn)  # (B, T, V)
        g = torch.sigmoid(self.gate(h).float()) * valid.any(-1, keepdim=True)  # (B, T, 1)
        return torch.log((1 - g) * logp.exp() + g * p_copy + 1e-9)


def model_loss(model: RetroModel, x: torch.Tensor, y: torch.Tensor, neighbors) -> torch.Tensor:
    """Mean next-token loss; with the pointer lever and neighbours, of the LM + copy-head mixture."""
    if getattr(model, "pointer", None) is None or neighbors is None:
        return model.loss(x, y, neighbors)[0]
    h = model.hidden_states(x, neighbors)  # (B, T, D)
    logp = model.pointer(F.log_softmax(model.lm_head(h).float(), -1), h, x, neighbors, model.chunk_len)
    return F.nll_loss(logp.flatten(0, 1), y.flatten(), ignore_index=-100)


def optimizer(model: RetroModel, args) -> torch.optim.Optimizer:
    """nanoGPT groups, each split into the retrieval parameters (encoder, CCA) and the rest, for the LR scale."""
    retrieval = {id(p) for name, p in model.named_parameters() if name.startswith("encoder.") or ".cca" in name}
    groups = []
    for group in model.param_groups(0.1):
        for is_retrieval in (False, True):
            params = [p for p in group["params"] if (id(p) in retrieval) == is_retrieval]
            if params:
                groups.append({"params": params, "weight_decay": group["weight_decay"],
                               "lr_scale": args.retrieval_lr_scale if is_retrieval else 1.0})
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))


def batch(ds: RetroDataset, rows, k: int, slots: str):
    """(input_ids, targets, neighbors (B, L, k, R)): the first k slots, or the last k (`slots="last"`, where the
    copy warm-up puts its copy) / the first k-1 plus the last (`"copy"`)."""
    samples = [ds[int(i)] for i in rows]
    neighbors = torch.stack([s.neighbors for s in samples])  # (B, L, K_file, R)
    if slots == "last":
        neighbors = neighbors[:, :, -k:]
    elif slots == "copy":
        neighbors = torch.cat([neighbors[:, :, :k - 1], neighbors[:, :, -1:]], dim=2)
    else:
        neighbors = neighbors[:, :, :k]
    return torch.stack([s.input_ids for s in samples]), torch.stack([s.targets for s in samples]), neighbors


@torch.no_grad()
def losses(model: RetroModel, ds: RetroDataset, k: int, slots: str, bf16: bool, n: int = 24) -> tuple[float, float]:
    x, y, neighbors = batch(ds, np.random.default_rng(1).choice(len(ds), min(n, len(ds)), replace=False), k, slots)
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        return model_loss(model, x, y, neighbors).item(), model_loss(model, x, y, None).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workspace", required=True)
    p.add_argument("--kfile", type=int, default=4, help="K of the workspace's neighbour files")
    p.add_argument("--k", type=int, default=2, help="neighbours the model reads")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--copy_rate", type=float, default=0.0)
    p.add_argument("--tie", choices=("none", "tied", "init"), default="none")
    p.add_argument("--cca_value_init", type=float, default=0.0)
    p.add_argument("--retrieval_lr_scale", type=float, default=1.0)
    p.add_argument("--lever", choices=("none", "smear", "pointer", "induction"), default="none")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("bf16", "32"), default="bf16",
                   help="32 on CPUs without AVX-512 bf16, where bf16 autocast is emulated and slower")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    ws = open_workspace(args.workspace)
    train = RetroDataset(args.workspace, "train", args.seq_len, args.kfile, args.copy_rate, args.seed)
    probe = RetroDataset(args.workspace, "train", args.seq_len, args.kfile, copy_neighbor_rate=1.0, seed=99)
    val = RetroDataset(args.workspace, "val", args.seq_len, args.kfile)
    model = build_model(args, workspace_tokenizer(ws).vocab_size, ws.chunk_len)
    opt = optimizer(model, args)
    rng, start = np.random.default_rng(args.seed), time.time()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            (probe_on, probe_off), (val_on, val_off) = (losses(model, probe, args.k, "last", args.precision == "bf16"),
                                                     losses(model, val, args.k, "first", args.precision == "bf16"))
            model.train()
            print(f"step {step:4d} {time.time() - start:6.0f}s  copy probe ON {probe_on:.3f} OFF {probe_off:.3f}  "
                  f"val ON {val_on:.3f} OFF {val_off:.3f}", flush=True)
        if step == args.steps:
            break
        scale = warmup_cosine(step, 30, args.steps, 0.1)
        for group in opt.param_groups:
            group["lr"] = args.lr * scale * group["lr_scale"]
        x, y, neighbors = batch(train, rng.choice(len(train), args.batch_size, replace=False), args.k,
                                "copy" if args.copy_rate > 0 else "first")
        with torch.autocast("cpu", torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model_loss(model, x, y, neighbors)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


if __name__ == "__main__":
    main()
