"""Generation with live retrieval: KV cache == recomputation, retrieval exactly at chunk boundaries."""
import pytest
import torch

from retro_lit.generate import generate, sample_next
from retro_lit.model import RetroModel

M, K, V = 4, 2, 50
R = 2 * M
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny(tiny_config):
    """Builds the model these tests decode with: 3 layers, CCA at 1 and 2, a 2-layer encoder."""
    config = tiny_config(vocab_size=V, chunk_size=M, n_layer=3, head_dim=8, cca_layers=(1, 2), enc_n_layer=2,
                         init_std=0.2)
    return lambda: RetroModel.from_config(config).eval()


def fake_retrieve(chunk: torch.Tensor) -> torch.Tensor:
    """Deterministic neighbours (B, K, R) that depend on the chunk; the second neighbour has no continuation."""
    B = chunk.shape[0]
    base = (chunk.sum(-1, keepdim=True) + torch.arange(R)) % V  # (B, R)
    neighbors = torch.stack([base, (base * 7 + 3) % V], dim=1)  # (B, K, R)
    neighbors[:, 1, M:] = -1
    return neighbors.expand(B, K, R).clone()


@pytest.mark.parametrize("prompt_len", [1, 4, 9])
def test_greedy_with_cache_equals_recomputation(tiny, prompt_len):
    model = tiny()
    prompt = torch.randint(0, V, (2, prompt_len))
    cached = generate(model, prompt, fake_retrieve, max_new_tokens=14, temperature=0.0)
    recomputed = generate(model, prompt, fake_retrieve, max_new_tokens=14, temperature=0.0, use_cache=False)
    assert cached.shape == (2, prompt_len + 14)
    torch.testing.assert_close(cached, recomputed)
    assert torch.equal(cached[:, :prompt_len], prompt)


def test_greedy_without_retrieval_matches_too(tiny):
    model = tiny()
    prompt = torch.randint(0, V, (1, 5))
    torch.testing.assert_close(generate(model, prompt, None, 10, temperature=0.0),
                               generate(model, prompt, None, 10, temperature=0.0, use_cache=False))


@pytest.mark.parametrize("prompt_len,use_cache", [(6, True), (8, True), (6, False)])
def test_retrieval_happens_exactly_when_a_chunk_completes(tiny, prompt_len, use_cache):
    """Chunk u is looked up once, before the model reads its last token (u+1)*M - 1, after reading the rest."""
    model = tiny()
    fed = []  # tokens the model has read before each forward

    def count_tokens(module, args, kwargs):
        fed.append(args[0].shape[1] if kwargs.get("cache") is not None else 0)

    model.register_forward_pre_hook(count_tokens, with_kwargs=True)
    calls = []

    def retrieve(chunk):
        calls.append((sum(fed), chunk.clone()))
        return fake_retrieve(chunk)

    new = 13
    tokens = generate(model, torch.randint(0, V, (1, prompt_len)), retrieve, new, temperature=0.0, use_cache=use_cache)
    n_chunks = (prompt_len + new - 1) // M  # chunks whose last token is fed to the model
    assert len(calls) == n_chunks
    for u, (read, chunk) in enumerate(calls):
        assert torch.equal(chunk, tokens[:, u * M:(u + 1) * M])
        if use_cache:  # prompt chunks in the prefill, later ones right before their last token is fed
            assert read == (0 if (u + 1) * M <= prompt_len else (u + 1) * M - 1)


def test_on_retrieval_reports_each_lookup(tiny):
    seen = []
    tokens = generate(tiny(), torch.randint(0, V, (1, 2)), fake_retrieve, 9, temperature=0.0,
                      on_retrieval=lambda u, chunk, found: seen.append((u, found.shape)))
    assert seen == [(0, (1, K, R)), (1, (1, K, R))] and tokens.shape == (1, 11)


def test_retrieve_must_return_two_chunks_of_tokens(tiny):
    with pytest.raises(ValueError, match=f"expected R = 2M = {R}.*got R = {M}"):
        generate(tiny(), torch.randint(0, V, (1, 5)), lambda chunk: fake_retrieve(chunk)[..., :M], 4)


class NoCacheModel(RetroModel):
    """Stands in for RETRO-fit models that cannot decode incrementally."""

    def new_cache(self, *args, **kwargs):
        raise NotImplementedError


def test_model_without_cache_falls_back_to_recomputation(tiny):
    model = tiny()
    no_cache = NoCacheModel.from_config(model.config).eval()
    no_cache.load_state_dict(model.state_dict())
    prompt = torch.randint(0, V, (1, 5))
    torch.testing.assert_close(generate(no_cache, prompt, fake_retrieve, 10, temperature=0.0),
                               generate(model, prompt, fake_retrieve, 10, temperature=0.0))


def test_bf16_autocast_generation_matches_recomputation(tiny):
    """Under bf16 autocast the float32 KV cache path and full recomputation agree (greedy)."""
    model = tiny()
    prompt = torch.randint(0, V, (1, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cached = generate(model, prompt, fake_retrieve, 6, temperature=0.0)
        recomputed = generate(model, prompt, fake_retrieve, 6, temperature=0.0, use_cache=False)
    assert cached.shape == (1, 11) and torch.equal(cached, recomputed)


def test_sampling_is_seeded_and_filters(tiny):
    logits = torch.randn(3, V)
    assert torch.equal(sample_next(logits, 1.0, top_k=1), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 1.0, top_p=1e-6), logits.argmax(-1))
    a = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(3))
    b = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    top3 = logits.topk(3, -1).indices
    for _ in range(5):
        assert (sample_next(logits, 2.0, top_k=3)[:, None] == top3).any(-1).all()
    model = tiny()
    prompt = torch.randint(0, V, (1, 3))
    runs = [generate(model, prompt, fake_retrieve, 8, temperature=1.0, top_k=10, seed=7) for _ in range(2)]
    assert torch.equal(*runs)


# ----------------------------------------------------------------------------- the command, on a tiny workspace

def test_generate_command_shows_each_retrieval(tiny_workspace, tmp_path, monkeypatch, capsys):
    from retro_lit.commands import main

    ws, ckpt, embedder, _ = tiny_workspace
    monkeypatch.setattr("retro_lit.index.workspace_embedder", lambda *args, **kwargs: embedder)
    argv = ["--ckpt_path", str(ckpt), "--workspace", str(ws), "--prompt", "the king", "--max_new_tokens", "6",
            "--temperature", "0", "--show_retrieval", "--device", "cpu"]
    assert main(["generate", *argv]) == 0
    out = capsys.readouterr().out
    assert out.count("[retrieval]") == (8 + 6 - 1) // M  # one lookup per chunk fed to the model
    assert "distance" in out and "corpus.txt#" in out and out.rstrip().splitlines()[-1].startswith("the king")
    assert main(["generate", *argv, "--no_retrieval"]) == 0 and "[retrieval]" not in capsys.readouterr().out
    assert main(["generate", *argv[:2], "--workspace", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert main(["generate", "--prompt", "x"]) == 2 and capsys.readouterr().err.startswith("error: ")
