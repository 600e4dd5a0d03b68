"""Small synthetic inputs shared by tests: a multi-document corpus file (no corpus is committed)."""
import random
from pathlib import Path

WORDS = ("king queen crown sword castle night storm river ship letter garden poison honour father daughter "
         "servant battle army field winter summer wine gold silver ghost dream forest tower bell").split()


def write_corpus(path: Path, n_docs: int = 10, words_per_doc: int = 700) -> Path:
    """Seeded documents of random sentences, separated by blank-line runs (one document each)."""
    rng = random.Random(0)
    docs = []
    for d in range(n_docs):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "."
                     for _ in range(words_per_doc // 8)]
        docs.append(f"Document {d}.\n" + " ".join(sentences))
    path.write_text("\n\n\n".join(docs), encoding="utf-8")
    return path
