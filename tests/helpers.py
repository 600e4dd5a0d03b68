"""Plain functions that conftest.py's fixtures and the test modules share (this is not a test module).

Module-scoped fixtures and module-level helpers call these directly; a test asks for the fixtures in conftest.py.
transformers is imported inside `tiny_bert`: it takes seconds, and most test modules never need it.
"""
import random
from pathlib import Path

import torch

from retro_lit.build import build_workspace
from retro_lit.embedder import BERTForChunkEmbeddings, default_model_path

M, K, T = 8, 2, 32  # the tiny database of `build`: chunk length, neighbours, training sequence length
WORDS = ("king queen crown sword castle night storm river ship letter garden poison honour father daughter "
         "servant battle army field winter summer wine gold silver ghost dream forest tower bell").split()


def make_corpus(path: Path, n_docs: int = 30, words_per_doc: int = 32, seed: int = 0,
                one_file_per_doc: bool = False) -> Path:
    """Seeded documents of random sentences (5-12 words each) headed `Document <i>.`: one file with the documents
    separated by blank-line runs, or (one_file_per_doc) a folder of `doc<iii>.txt` files."""
    rng = random.Random(seed)
    docs = []
    for d in range(n_docs):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
                     for _ in range(words_per_doc // 8)]
        docs.append(f"Document {d}.\n" + " ".join(sentences))
    if not one_file_per_doc:
        path.write_text("\n\n\n".join(docs), encoding="utf-8")
        return path
    path.mkdir(parents=True, exist_ok=True)
    for d, text in enumerate(docs):
        (path / f"doc{d:03d}.txt").write_text(text + "\n", encoding="utf-8")
    return path


def tiny_bert(name: str = "tiny-bert", dtype: torch.dtype | None = None) -> BERTForChunkEmbeddings:
    """A new random 1-layer BERT (E = 16, seeded) with the MiniLM WordPiece tokenizer, 32 texts a batch;
    dtype: of its autocast (None: the embedder's default, bf16 on the CPU)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    return BERTForChunkEmbeddings(name, "cpu", model=BertModel(config), tokenizer=tokenizer, batch_size=32,
                                  dtype=dtype)


def save_bert(bert: BERTForChunkEmbeddings, folder: Path) -> Path:
    """Save model and tokenizer so that `--embedder <folder>` loads them."""
    bert.model.save_pretrained(folder)
    bert.tokenizer.save_pretrained(folder)
    return folder


def build(workspace: Path, corpus: Path, embedder, **settings) -> Path:
    """Build the tiny database (bpe:300, chunks of M, K neighbours for windows of T, blocks of 64 chunks)."""
    settings = {"tokenizer": "bpe:300", "chunk_len": M, "num_neighbors": K, "seq_len": T, "block_size": 64,
                "quiet": True} | settings
    return build_workspace(workspace, corpus, embedder=embedder, **settings)


def snapshot(root: Path) -> dict[str, bytes]:
    """The bytes of every file under root, by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
