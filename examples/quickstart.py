"""The original retro_transformer quick-start, run under retro_lit.

Only the imports and the embedder name changed (None = the bundled all-MiniLM-L6-v2; 'cuda' falls back to
the CPU with a warning when there is no GPU). Three additions so that it runs anywhere and tests can shrink it:
`text.txt` is written from the bundled Shakespeare plays when missing (documents separated by blank-line
runs), `python examples/quickstart.py [TEXT_FILE] [MAX_STEPS]` overrides the file and the step count, and
`RETRO_LIT_QUICKSTART_SMALL=1` trains a 6-layer, 32-wide model instead (seconds a step on a CPU, not a minute).
"""
import os
import sys
from pathlib import Path

from retro_lit import (BERTForChunkEmbeddings, NearestNeighborEncoder, RetroIndex, RetroModel, build_database,
                       build_dataset, train)
from retro_lit.corpus import iter_documents

# Configuração
config = {
    'chunk_len': 16,
    'd_model': 128,
    'd_ff': 512,
    'n_heads': 16,
    'd_k': 16,
    'n_layers': 16,
    'workspace': './workspace',
    'text_file': sys.argv[1] if len(sys.argv) > 1 else 'text.txt'
}
max_steps = int(sys.argv[2]) if len(sys.argv) > 2 else 300
if os.environ.get('RETRO_LIT_QUICKSTART_SMALL') == '1':  # the cross-attention layers {3}, {3, 5} still exist
    config.update(d_model=32, d_ff=64, n_heads=2, n_layers=6)
if not Path(config['text_file']).exists():  # a few plays, one document each
    plays = [doc.text for doc in iter_documents('shakespeare')][:6]
    Path(config['text_file']).write_text('\n\n\n'.join(plays), encoding='utf-8')

# Inicializar embeddings do BERT
bert = BERTForChunkEmbeddings(None, 'cuda')
index = RetroIndex(config['workspace'], config['chunk_len'], bert=bert)

# Construir banco de dados e conjunto de dados
build_database(config['workspace'], config['text_file'],
               bert=bert, chunk_len=config['chunk_len'])
num_tokens = build_dataset(config['workspace'], config['text_file'],
                           chunk_len=config['chunk_len'], index=index)

# Criar codificador
encoder = NearestNeighborEncoder(
    chunk_len=config['chunk_len'],
    n_layers=config['n_layers'],
    d_model=config['d_model'],
    d_ff=config['d_ff'],
    n_heads=config['n_heads'],
    d_k=config['d_k'],
    ca_layers={3}
)

# Inicializar modelo RETRO
model = RetroModel(
    n_vocab=num_tokens,
    d_model=config['d_model'],
    n_layers=config['n_layers'],
    chunk_len=config['chunk_len'],
    n_heads=config['n_heads'],
    d_k=config['d_k'],
    d_ff=config['d_ff'],
    encoder=encoder,
    ca_layers={3, 5}
)

# Treinar o modelo
train(model, config['workspace'], config['text_file'],
      chunk_len=config['chunk_len'], d_model=config['d_model'], max_steps=max_steps)
