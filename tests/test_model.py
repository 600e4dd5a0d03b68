"""Behavioural tests of the RETRO model: shapes, causality, CCA semantics, masking, caching, bf16."""
import math

import pytest
import torch
import torch.nn.functional as F

from retro_lit.model import (ChunkedCrossAttention, NearestNeighborEncoder, RetroConfig, RetroModel,
                             apply_rope, rope_cos_sin)

M, K, B = 4, 2, 2
R = 2 * M


@pytest.fixture
def tiny(tiny_config):
    """Builds a model of 3 layers with CCA at 1 and 2, heads of 8 and a 2-layer encoder; overrides are
    RetroConfig fields."""
    def build(**overrides) -> RetroModel:
        cfg = dict(vocab_size=50, chunk_size=M, n_layer=3, head_dim=8, cca_layers=(1, 2), enc_n_layer=2) | overrides
        return RetroModel.from_config(tiny_config(**cfg)).eval()
    return build


def random_batch(T=16, vocab=50, n_chunks=None):
    L = n_chunks if n_chunks is not None else T // M
    return torch.randint(0, vocab, (B, T)), torch.randint(0, vocab, (B, L, K, R))


def test_shapes_and_param_counts(tiny):
    model = tiny()
    tokens, neighbors = random_batch()
    assert model(tokens, neighbors).shape == (B, 16, 50)
    memory, valid = model.run_encoder(neighbors, torch.randn(B, 16, 32))
    assert memory.shape == (B, 4, K * R, 32) and valid.shape == (B, 4, K * R)
    counts = model.num_params()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["encoder"] > 0 and counts["decoder"] > 0


def test_decoder_causality(tiny):
    model = tiny()
    tokens, neighbors = random_batch()
    base = model(tokens, neighbors)
    for t in (3, 9):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % 50
        out = model(changed, neighbors)
        torch.testing.assert_close(out[:, :t], base[:, :t])
        assert not torch.allclose(out[:, t:], base[:, t:])


@pytest.mark.parametrize("u", [0, 1, 3])
def test_retrieval_causality(tiny, u):
    """Neighbours of chunk u reach only positions >= (u+1)*M - 1 (the last token of chunk u onwards)."""
    model = tiny()
    tokens, neighbors = random_batch()
    base = model(tokens, neighbors)
    changed = neighbors.clone()
    changed[:, u] = torch.randint(0, 50, (B, K, R))
    out = model(tokens, changed)
    boundary = (u + 1) * M - 1
    torch.testing.assert_close(out[:, :boundary], base[:, :boundary])
    assert not torch.allclose(out[:, boundary], base[:, boundary])


def reference_cca(cca: ChunkedCrossAttention, x, memory, valid):
    """Slow, obviously-correct CCA: a loop over positions with explicit masks and manual softmax."""
    attn, H, Dh = cca.attn, cca.attn.n_head, cca.attn.head_dim
    Bx, T, D = x.shape
    out = torch.zeros_like(x)
    for b in range(Bx):
        for p in range(T):
            u = (p + 1) // M - 1  # the chunk whose neighbours p may see
            if u < 0 or u >= memory.shape[1] or not valid[b, u].any():
                continue
            i = p - ((u + 1) * M - 1)  # index of p in the attending chunk
            q = attn.query(x[b, p]).view(H, Dh)
            kv = attn.key_value(memory[b, u]).view(-1, 2, H, Dh)
            k, v = kv[:, 0].transpose(0, 1), kv[:, 1].transpose(0, 1)  # (H, K*R, Dh)
            q = apply_rope(q[:, None], *rope_cos_sin(torch.tensor([M - 1 + i]), Dh, cca.rope_base))[:, 0]
            k = apply_rope(k, *rope_cos_sin(torch.arange(k.shape[1]) % R, Dh, cca.rope_base))
            scores = (k @ q[:, :, None])[..., 0] / math.sqrt(Dh)  # (H, K*R)
            scores = scores.masked_fill(~valid[b, u], float("-inf"))
            weights = scores.softmax(-1)
            if cca.sink is not None:  # a null key per head: its logit joins the softmax, its value is zero
                weights = torch.cat([scores, cca.sink[:, None]], dim=-1).softmax(-1)[:, :-1]
            out[b, p] = attn.out((weights[:, :, None] * v).sum(1).flatten())
    return out


@pytest.mark.parametrize("sink", [False, True])
@pytest.mark.parametrize("T", [16, 13, 3])
def test_cca_matches_reference(T, sink):
    torch.manual_seed(1)
    cca = ChunkedCrossAttention(d_model=16, n_head=2, head_dim=8, chunk_len=M, d_memory=12, sink=sink)
    if sink:
        cca.sink.data = torch.tensor([-1.0, 2.0])
    L = max(T // M, 1)
    x, memory = torch.randn(B, T, 16), torch.randn(B, L, K * R, 12)
    valid = torch.rand(B, L, K * R) > 0.3
    valid[0, 0] = False  # a chunk with no neighbour at all
    got = cca(x, cca.project(memory), valid)
    torch.testing.assert_close(got, reference_cca(cca, x, memory, valid), rtol=1e-4, atol=1e-5)


def test_each_neighbor_is_encoded_on_its_own_chunk(tiny):
    """The encoder sees neighbour (chunk u, slot j) with chunk u's states only, whatever the other slots hold."""
    model = tiny()
    _, neighbors = random_batch()
    h = torch.randn(B, 16, 32)
    memory, _ = model.run_encoder(neighbors, h)  # (B, L, K*R, E)
    for u in range(4):
        for j in range(K):
            alone, _ = model.run_encoder(neighbors[:, u:u + 1, j:j + 1], h[:, u * M:(u + 1) * M])  # (B, 1, R, E)
            torch.testing.assert_close(memory[:, u, j * R:(j + 1) * R], alone[:, 0], rtol=1e-4, atol=1e-5)


def test_masked_neighbor_equals_removed_neighbor(tiny):
    model = tiny()
    tokens, neighbors = random_batch()
    masked = neighbors.clone()
    masked[:, :, 1] = -1  # second neighbour slot missing everywhere
    torch.testing.assert_close(model(tokens, masked), model(tokens, neighbors[:, :, :1]))


def test_all_padding_neighbors_equal_retrieval_off(tiny):
    model = tiny()
    tokens, neighbors = random_batch()
    out = model(tokens, torch.full_like(neighbors, -1))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, model(tokens, None))


def test_retrieval_off_equals_model_without_cca(tiny):
    model = tiny()
    plain = tiny(cca_layers=())
    state = {k: v for k, v in model.state_dict().items() if k in plain.state_dict()}
    plain.load_state_dict(state)
    tokens, _ = random_batch()
    torch.testing.assert_close(model(tokens), plain(tokens))


def test_any_length_and_any_k(tiny):
    model = tiny()
    for T, L, k in [(13, 3, 2), (5, 1, 4), (2, 0, 1)]:
        tokens = torch.randint(0, 50, (B, T))
        neighbors = torch.randint(0, 50, (B, L, k, R))
        assert torch.isfinite(model(tokens, neighbors)).all()


@pytest.mark.parametrize("given", [M, 2 * M + 1])
def test_neighbors_of_other_than_two_chunks_are_refused(tiny, given):
    """R = 2M (neighbour + continuation) is what CCA's positions assume: another R is an error naming both."""
    model = tiny()
    tokens, _ = random_batch()
    neighbors = torch.randint(0, 50, (B, 4, K, given))
    message = f"expected R = 2M = {R}.*got R = {given}"
    with pytest.raises(ValueError, match=message):
        model(tokens, neighbors)
    with pytest.raises(ValueError, match=message):
        model(tokens, neighbors, cache=model.new_cache(B, 16))


def test_heads_times_dk_differs_from_d_model():
    """The original quick-start config: n_heads * d_k = 256 != d_model = 128."""
    encoder = NearestNeighborEncoder(chunk_len=M, n_layers=2, d_model=128, d_ff=256, n_heads=16, d_k=16, ca_layers={1})
    model = RetroModel(50, 128, 4, M, 16, 16, 256, encoder, ca_layers={1, 3})
    tokens, neighbors = random_batch()
    assert model(tokens, neighbors).shape == (B, 16, 50)


def test_every_parameter_gets_a_finite_gradient(tiny):
    model = tiny().train()
    tokens, neighbors = random_batch()
    neighbors[0, 1] = -1
    F.cross_entropy(model(tokens, neighbors).flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_bf16_autocast_forward_backward(tiny):
    """bf16 (whose short attentions run SDPA's math kernel in bf16, the encoder recomputed in backward) gives
    the fp32 gradients to bf16 accuracy, and leaves torch's global SDPA setting as it found it."""
    model = tiny().train()
    tokens, neighbors = random_batch()

    def grads(bf16: bool) -> torch.Tensor:
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(tokens, neighbors).flatten(0, 1).float(), tokens.flatten())
        loss.backward()
        assert torch.isfinite(loss)
        return torch.cat([p.grad.flatten() for p in model.encoder.parameters()])

    assert not torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    assert F.cosine_similarity(grads(True), grads(False), dim=0) > 0.99
    assert not torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()


@pytest.mark.parametrize("cca_init", ["normal", "induction", "induction+sink"])  # smeared keys, null keys
def test_kv_cache_matches_full_forward(tiny, cca_init):
    """Prefill + one token at a time, retrieving as chunks complete, equals one full forward."""
    model = tiny(cca_init=cca_init.removesuffix("+sink"), tie_embeddings=cca_init != "normal",
                 cca_sink=cca_init.endswith("+sink"), head_dim=16)  # 2 heads of 16 = d_model: the induction init's
    if cca_init != "normal":  # move the identity inits off their special values, so every path counts
        for p in model.parameters():
            p.data.add_(0.05 * torch.randn_like(p))
    T = 15
    tokens, neighbors = random_batch(T=T, n_chunks=T // M)
    full = model(tokens, neighbors)
    cache = model.new_cache(B, 32)
    steps = [tokens[:, :6]] + [tokens[:, i:i + 1] for i in range(6, T)]
    outs, pos = [], 0
    for step in steps:
        done = range(pos // M, (pos + step.shape[1]) // M)  # chunks completed by these tokens
        outs.append(model(step, neighbors[:, done.start:done.stop] if len(done) else None, cache=cache))
        pos += step.shape[1]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-5)


def test_overfits_one_batch(tiny):
    model = tiny().train()
    tokens, neighbors = random_batch()
    opt = torch.optim.AdamW(model.param_groups(0.01), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(tokens[:, :-1], None).flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_config_validation_names_the_flag():
    with pytest.raises(ValueError, match="cca_layers"):
        RetroConfig(n_layer=2, cca_layers=(5,))
    with pytest.raises(ValueError, match="`model.config.enc_cross_layers`"):  # a shared EncoderConfig field
        RetroConfig(enc_n_layer=1, enc_cross_layers=(1,))
    with pytest.raises(ValueError, match="tie_embeddings"):
        RetroConfig(cca_init="induction")


@pytest.mark.parametrize("widths", [dict(n_head=4, head_dim=32), dict(enc_d_model=128)])
def test_induction_init_refuses_widths_where_it_would_be_a_partial_identity(widths):
    induction = dict(d_model=256, n_head=4, head_dim=64, tie_embeddings=True, cca_init="induction")
    RetroConfig(**induction)  # n_head * head_dim = enc_d_model = d_model: accepted
    with pytest.raises(ValueError, match=r"cca_init: induction.*equal to d_model \(256\)"):
        RetroConfig(**{**induction, **widths})
    RetroConfig(**{**induction, **widths, "cca_init": "normal"})  # the paper's init takes any widths


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_loss_matches_cross_entropy(tiny, autocast):
    model = tiny().train()
    tokens, neighbors = random_batch()
    targets = tokens.roll(-1, 1)
    targets[:, -3:] = -100
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, nll = model.loss(tokens, targets, neighbors)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(tokens, neighbors)
    ref = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    ref.sum().div((targets != -100).sum()).backward()
    tol = dict(rtol=2e-2, atol=2e-3) if autocast else dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(nll, ref.detach(), **tol)
    assert (nll[:, -3:] == 0).all()
    for n, p in model.named_parameters():
        torch.testing.assert_close(fused[n], p.grad, **tol, msg=n)


def test_quickstart_model_round_trips_through_its_config():
    encoder = NearestNeighborEncoder(chunk_len=M, n_layers=3, d_model=24, d_ff=48, n_heads=3, d_k=8, ca_layers={2}, d_input=32)
    model = RetroModel(50, 32, 4, M, 2, 8, 64, encoder, ca_layers={1, 3})
    rebuilt = RetroModel.from_config(model.config)
    rebuilt.load_state_dict(model.state_dict())  # same parameter names and shapes
    tokens, neighbors = random_batch()
    torch.testing.assert_close(rebuilt.eval()(tokens, neighbors), model.eval()(tokens, neighbors))


def test_bf16_training_tracks_fp32_within_two_percent(tiny):
    """Quality is not bought with speed: the bf16-autocast loss curve stays within 2% of fp32's."""
    def losses(bf16: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = tiny(vocab_size=64, chunk_size=8, d_model=64, n_head=2, head_dim=32, d_ff=128, n_layer=2,
                     cca_layers=(1,), enc_n_layer=1).train()
        opt = torch.optim.AdamW(model.param_groups(0.1), lr=3e-3)
        g = torch.Generator().manual_seed(1)
        text = torch.randint(0, 64, (2000,), generator=g)  # a fixed "corpus" the model can learn
        curve = []
        for _ in range(20):
            starts = torch.randint(0, 1800, (8,), generator=g).tolist()
            x = torch.stack([text[s:s + 65] for s in starts])
            neighbors = torch.stack([text[(s + 97) % 1800:][:64].view(4, 2, 8).repeat(1, 1, 2) for s in starts])
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss, _ = model.loss(x[:, :-1], x[:, 1:], neighbors)
            loss.backward()
            opt.step()
            curve.append(loss.item())
        return torch.tensor(curve).view(4, 5).mean(1)  # 5-step means (bf16 is ~1e-4 off; 2% is far)

    fp32, bf16 = losses(False), losses(True)
    assert fp32[-1] < fp32[0]
    assert ((bf16 - fp32).abs() / fp32).max() < 0.02


def test_model_learns_to_copy_from_its_neighbors(tiny):
    """Random tokens are unpredictable (loss ln V) unless read from the neighbour, which holds each
    chunk's true continuation: the loss must fall well below ln V, so CCA, encoder and masks carry it."""
    torch.manual_seed(0)
    V, L, Bc = 64, 4, 16
    model = tiny(vocab_size=V, chunk_size=8, d_model=64, n_layer=2, n_head=2, head_dim=32, d_ff=128,
                 cca_layers=(1,), enc_n_layer=1).train()
    opt = torch.optim.AdamW(model.param_groups(0.0), lr=3e-3)
    for _ in range(80):  # ~0.37 ln V by then (0.03 after 150 steps)
        x = torch.randint(0, V, (Bc, (L + 1) * 8 + 1))
        chunks = x[:, :(L + 1) * 8].view(Bc, L + 1, 8)
        neighbors = torch.cat([chunks[:, :L], chunks[:, 1:]], dim=-1)[:, :, None]  # (B, L, 1, 2M)
        loss, nll = model.loss(x[:, :L * 8], x[:, 1:L * 8 + 1], neighbors)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert nll[:, 16:].mean() < 0.8 * math.log(V)  # positions that can see a continuation


@pytest.mark.parametrize("cca_init", ["normal", "induction"])
def test_induction_init_copies_before_any_training(tiny, cca_init):
    """cca_init=induction starts the first CCA layer as an induction head: before any step, positions whose
    neighbour holds [their chunk, its continuation] predict the next token well below ln V (random tokens), and
    retrieval OFF stays at ln V. The normal init is the control: ON equals OFF."""
    torch.manual_seed(0)
    V, L, Mc = 256, 4, 8
    model = tiny(vocab_size=V, chunk_size=Mc, d_model=64, n_head=2, head_dim=32, d_ff=256, enc_n_layer=1,
                 tie_embeddings=True, cca_init=cca_init)
    x = torch.randint(0, V, (8, (L + 1) * Mc + 1))
    chunks = x[:, :(L + 1) * Mc].view(8, L + 1, Mc)
    neighbors = torch.cat([chunks[:, :L], chunks[:, 1:]], dim=-1)[:, :, None]  # (B, L, 1, 2M)
    with torch.no_grad():
        (_, on), (_, off) = (model.loss(x[:, :L * Mc], x[:, 1:L * Mc + 1], n) for n in (neighbors, None))
    on, off = on[:, Mc:].mean().item(), off[:, Mc:].mean().item()  # positions that read a neighbour
    assert abs(off - math.log(V)) < 0.2
    if cca_init == "induction":
        assert on < off - 0.5  # 4.4 vs 5.6 nats at this width; 2.2 vs 5.6 at d_model = 256
    else:
        assert abs(on - off) < 0.05


def test_cca_sink_reads_nothing_where_no_neighbor_fits(tiny):
    """With `cca_sink`, the induction head still copies where a neighbour continues the chunk, and where the
    neighbours are random tokens (nothing matches) it stays much nearer retrieval OFF than the same head
    without the null key, which must spread its weight over the unrelated neighbours."""
    torch.manual_seed(0)
    V, L, Mc = 256, 4, 8
    x = torch.randint(0, V, (8, (L + 1) * Mc + 1))
    chunks = x[:, :(L + 1) * Mc].view(8, L + 1, Mc)
    copies = torch.cat([chunks[:, :L], chunks[:, 1:]], dim=-1)[:, :, None]  # (B, L, 1, 2M)
    unrelated = torch.randint(0, V, copies.shape)
    score = {}
    for sink in (False, True):
        torch.manual_seed(1)
        model = tiny(vocab_size=V, chunk_size=Mc, d_model=64, n_head=2, head_dim=32, d_ff=256, enc_n_layer=1,
                     tie_embeddings=True, cca_init="induction", cca_sink=sink)
        with torch.no_grad():
            score[sink] = {name: model.loss(x[:, :L * Mc], x[:, 1:L * Mc + 1], n)[1][:, Mc:].mean().item()
                           for name, n in (("copies", copies), ("unrelated", unrelated), ("off", None))}
    with_sink, without = score[True], score[False]
    assert with_sink["copies"] < with_sink["off"] - 0.5
    assert abs(with_sink["unrelated"] - with_sink["off"]) < 0.5 * abs(without["unrelated"] - without["off"]), score
