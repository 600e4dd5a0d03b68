"""`retro-lit diagnose`: the copyable share on a hand-made workspace, CCA update norms, the command end to end."""
import json
from pathlib import Path
import math

import numpy as np
import pytest
import torch

from retro_lit.commands import main
from retro_lit.diagnose import CCANorms, copyable_share, twin_check, write_twin_corpus
from retro_lit.model import RetroModel
from retro_lit.workspace import Workspace

ROOT = Path(__file__).resolve().parents[1]

M, K = 4, 2
pytestmark = pytest.mark.usefixtures("one_thread")


def hand_made_workspace(root, split_docs: dict[str, list[list[list[int]]]]) -> Workspace:
    """A workspace of chunks only: per split, documents given as lists of chunks of M tokens (0 = padding)."""
    chunks, chunk_doc, offsets, splits = [], [], [0], {}
    for split, docs in split_docs.items():
        first = len(chunks)
        for doc in docs:
            chunks += doc
            chunk_doc += [len(offsets) - 1] * len(doc)
            offsets.append(len(chunks))
        splits[split] = [first, len(chunks)]
    for name, array in (("chunks", np.array(chunks, dtype=np.uint16)), ("chunk_doc", np.array(chunk_doc, np.int32)),
                        ("doc_offsets", np.array(offsets, np.int64))):
        np.save(root / f"{name}.npy", array)
    return Workspace(root, {"settings": {"chunk_len": M}, "counts": {"pad_id": 0}, "splits": splits})


def test_copyable_share_counts_neighbors_that_hold_the_next_chunk(tmp_path):
    A, B, C, D, E = [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16], [17, 18, 0, 0]
    ws = hand_made_workspace(tmp_path, {"train": [[A, B], [C, D, E]], "val": [],
                                        "test": [[[21, 22, 23, 24], B, [31, 32, 0, 0]], [A, [41, 42, 43, 44]]]})
    ids = np.array([[0, 2],    # chunk 21..24: neighbour A, whose continuation B is the chunk's own next chunk
                    [3, -1],   # chunk B: neighbour D (+ E), nothing of its next chunk 31 32
                    [1, 2],    # chunk 31 32: the document's last chunk, no next chunk
                    [0, -1],   # chunk A: neighbour A itself (a copy of the chunk, not of what follows)
                    [2, -1]])  # chunk 41..44: the last chunk again
    share = copyable_share(ws, "test", ids, min_run=4)
    assert share == {"chunks": 5, "with_continuation": 3, "continuation_share": 1 / 3, "chunk_share": 1 / 5}
    nothing = copyable_share(ws, "test", ids, min_run=5)  # no run is longer than a chunk here
    assert nothing["continuation_share"] == nothing["chunk_share"] == 0
    sampled = copyable_share(ws, "test", ids, min_run=4, max_chunks=2, seed=1)
    assert sampled["chunks"] == 2 and sampled == copyable_share(ws, "test", ids, min_run=4, max_chunks=2, seed=1)


@pytest.fixture
def tiny(tiny_config):
    """Builds a model of 3 layers with CCA at 1 and 2, heads of 8 and a larger init."""
    config = tiny_config(vocab_size=40, chunk_size=M, n_layer=3, head_dim=8, cca_layers=(1, 2), init_std=0.2)
    return lambda: RetroModel.from_config(config).eval()


def test_cca_norms_give_one_ratio_per_layer_and_zero_without_output_projection(tiny):
    model = tiny()
    tokens, neighbors = torch.randint(0, 40, (2, 16)), torch.randint(0, 40, (2, 4, K, 2 * M))
    with CCANorms(model) as norms:
        model(tokens, neighbors)
        model(tokens, None)  # retrieval OFF runs no CCA and adds nothing
    ratios = norms.ratios()
    assert list(ratios) == [1, 2] and all(math.isfinite(r) and r > 0 for r in ratios.values())
    model(tokens, neighbors)  # hooks are gone after the `with`
    assert norms.ratios() == ratios
    for block in model.blocks[1:]:
        torch.nn.init.zeros_(block.cca.attn.out.weight)
    with CCANorms(model) as zeroed:
        model(tokens, neighbors)
    assert zeroed.ratios() == {1: 0.0, 2: 0.0}


def test_cca_norms_of_a_retrofit_model_at_step_zero_are_zero():
    """RETRO-fit starts with zeroed CCA output projections, so that retrieval ON is the frozen LM."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from retro_lit.retrofit import RetroFitModel

    lm = GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=32, n_layer=2, n_head=2, n_positions=32))
    model = RetroFitModel(lm, M, cca_layers=(0, 1), enc_n_layer=1).eval()
    with CCANorms(model) as norms:
        model(torch.randint(0, 40, (2, 16)), torch.randint(0, 40, (2, 4, K, 2 * M)))
    assert norms.ratios() == {0: 0.0, 1: 0.0}


def test_diagnose_command_prints_tables_and_writes_json(tiny_workspace, tmp_path, capsys):
    from retro_lit.commands import main

    ws, ckpt, _, _ = tiny_workspace
    out = tmp_path / "diagnosis.json"
    assert main(["diagnose", "--workspace", str(ws), "--ckpt_path", str(ckpt), "--device", "cpu", "--max_tokens", "200",
                 "--min_run", "3", "--json_path", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| test |" in table and "| 1 |" in table and "| random train chunks |" in table
    result = json.loads(out.read_text())
    assert result["neighbors"] == "k2_t16" and set(result["copyable"]) == {"train", "val", "test"}
    assert all(0 <= c["continuation_share"] <= 1 and c["with_continuation"] < c["chunks"]
               for c in result["copyable"].values())
    assert list(result["cca_ratio"]) == ["1"] and math.isfinite(result["cca_ratio"]["1"])
    assert list(result["bpb"]) == ["retrieval on", "random train chunks", "retrieval off"]
    assert all(math.isfinite(v) for v in result["bpb"].values())
    assert main(["diagnose", "--workspace", str(ws)]) == 0  # without a checkpoint: the copyable share only
    assert "CCA" not in capsys.readouterr().out
    for bad in (["--min_run", "0"], ["--split", "dev"], ["--workspace", str(tmp_path / "none")]):
        assert main(["diagnose", "--workspace", str(ws), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
    assert main(["diagnose", "--workspace", str(ws), "--num_neighbors", "5"]) == 2
    assert "k2_t16" in capsys.readouterr().err


def test_the_demo_recipe_reads_exact_copies_on_a_twin_corpus(tmp_path, tiny_corpus, tiny_bert_path):
    """The twin-corpus check (benchmarks/twin_corpus.py), tiny: every document twice, near-duplicate removal off,
    the demo's levers (induction-initialised CCA with null keys, a quarter of random neighbours) on
    configs/tiny.yaml. Test chunks whose twin is in the database score far below retrieval OFF (with
    `cca_init: normal` they score as OFF does after these steps). Files without a twin are not asserted on: at
    this size they are a file or two (the demo-size figure is benchmarks/twin_corpus.py's)."""
    n_files = write_twin_corpus(str(tiny_corpus("docs", n_docs=24, words_per_doc=240, one_file_per_doc=True)),
                                tmp_path / "twins")
    assert n_files == 48 and len(list((tmp_path / "twins").rglob("*.txt"))) == 48
    run = tmp_path / "run"
    assert main(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"), "--data.corpus", str(tmp_path / "twins"),
                 "--data.workspace", str(tmp_path / "ws"), "--data.embedder", str(tiny_bert_path),
                 "--data.dedup_threshold=null", "--data.split=[0.8,0.1,0.1]", "--trainer.precision=32",
                 "--model.config.tie_embeddings=true", "--model.config.cca_init=induction",
                 "--model.config.cca_sink=true", "--data.random_neighbor_rate=0.25", "--trainer.max_steps=60",
                 f"--trainer.default_root_dir={run}", "--trainer.enable_progress_bar=false"]) == 0
    report = twin_check(run / "checkpoints" / "last.ckpt", tmp_path / "ws", split="test")
    assert report["split"] == "test" and report["docs"]["twin in database"] > 0 and report["exact_copy_chunk_share"] > 0.9
    assert report["exact_copy_ratio"] < 0.5, report
